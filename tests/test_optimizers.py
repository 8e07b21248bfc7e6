"""train.optimizer and the learning-rate schedules: the built optimizer's class and state, the kwargs
checks, the memory estimate, the learning rates a schedule gives step by step, and exact resume for
every optimizer that runs on a CPU."""

from __future__ import annotations

import importlib.util
import math
from types import SimpleNamespace

import pytest
import torch
import yaml
from tiny import TINY

from orpo.cli import main
from orpo.config import ConfigError, TrainConfig, load_config
from orpo.train import ResumeError, Trainer, read_metrics, resume
from orpo.train import checkpoint as ckpt
from orpo.train.distributed import Engine, estimate_memory
from orpo.train.optim import build_optimizer, build_scheduler

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes (pip install 'orpo[optim]')")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(64, 32), torch.nn.Linear(32, 48), torch.nn.LayerNorm(48))


def _stepped(**train):
    """An optimizer built from ``train`` keys after two steps of a toy loss."""
    model = _model()
    opt = build_optimizer(model, TrainConfig(learning_rate=1e-3, **train))
    for _ in range(2):
        model(torch.arange(8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_adamw_is_the_default_with_full_precision_moments():
    model, opt = _stepped()
    assert type(opt) is torch.optim.AdamW
    state = opt.state[model[1].weight]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    # the fused kernel on the CPU too: no per-parameter sqrt and division copies in each step
    assert all(g["fused"] for g in opt.param_groups)


@needs_bnb
def test_adamw_8bit_keeps_uint8_moments_and_takes_its_kwargs():
    import bitsandbytes as bnb

    # min_8bit_size 1,000: the 32x48 matrix (1,536) is quantized, the 48 LayerNorm gains stay float32
    model, opt = _stepped(optimizer="adamw_8bit", adam_beta2=0.95, optimizer_kwargs={"min_8bit_size": 1000})
    assert type(opt) is bnb.optim.AdamW8bit
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
    matrix, gain = opt.state[model[1].weight], opt.state[model[2].weight]
    assert matrix["state1"].dtype == matrix["state2"].dtype == torch.uint8
    assert matrix["state1"].shape == model[1].weight.shape
    assert gain["state1"].dtype == torch.float32


def test_adafactor_is_torchs_and_factors_the_second_moment():
    model, opt = _stepped(optimizer="adafactor", weight_decay=0.1, optimizer_kwargs={"beta2_decay": -0.5})
    assert type(opt) is torch.optim.Adafactor
    assert opt.param_groups[0]["beta2_decay"] == -0.5 and opt.param_groups[0]["weight_decay"] == 0.1
    state = opt.state[model[1].weight]  # a 48 x 32 matrix: 48 + 32 numbers, no first moment
    assert state["row_var"].numel() + state["col_var"].numel() == 48 + 32
    assert "exp_avg" not in state


@needs_bnb
def test_lion_keeps_one_moment():
    import bitsandbytes as bnb

    model, opt = _stepped(optimizer="lion", adam_beta2=0.99)
    assert type(opt) is bnb.optim.Lion and opt.param_groups[0]["betas"] == (0.9, 0.99)
    state = opt.state[model[1].weight]
    assert state["state1"].shape == model[1].weight.shape and "state2" not in state


@pytest.mark.skipif(HAS_BNB, reason="bitsandbytes is installed")
@pytest.mark.parametrize("name", ["adamw_8bit", "lion"])
def test_a_bitsandbytes_optimizer_without_bitsandbytes_says_what_to_install(name):
    with pytest.raises(ConfigError, match=f"train.optimizer={name} needs bitsandbytes: pip install 'orpo\\[optim\\]'"):
        build_optimizer(_model(), TrainConfig(optimizer=name))


def test_an_unknown_optimizer_kwarg_names_the_optimizer_and_what_it_accepts():
    with pytest.raises(ConfigError) as e:
        build_optimizer(_model(), TrainConfig(optimizer="adafactor", optimizer_kwargs={"beta1": 0.9}))
    msg = str(e.value)
    assert "train.optimizer_kwargs: beta1 is not an argument of adafactor (Adafactor)" in msg
    assert "it accepts beta2_decay, eps, d, maximize" in msg
    # what orpo's own keys set is not a kwarg
    with pytest.raises(ConfigError, match="lr is not an argument of adamw"):
        build_optimizer(_model(), TrainConfig(optimizer_kwargs={"lr": 0.1}))


def test_a_bad_optimizer_kwarg_value_is_a_config_error():
    with pytest.raises(ConfigError, match="train.optimizer=adafactor: .*beta2_decay"):
        build_optimizer(_model(), TrainConfig(optimizer="adafactor", optimizer_kwargs={"beta2_decay": 0.5}))


def _raw(out, stories_dir, hh_path, **train):
    return {
        "model": {"init": TINY, "tokenizer": str(stories_dir)},
        "data": {"train": str(hh_path), "max_length": 64, "max_samples": 8},
        "train": {"output_dir": str(out), "max_steps": 4, "batch_size": 2, "learning_rate": 1e-3, "save_every": 2,
                  "save_total_limit": 4, **train},
    }


@pytest.mark.parametrize("name", ["paged_adamw_8bit", "paged_adamw_32bit"])
def test_paged_optimizers_on_a_cpu_are_one_line_and_exit_2_before_anything_loads(name, tmp_path, stories_dir,
                                                                                hh_path, capsys):
    out = tmp_path / "run"
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_raw(out, stories_dir, hh_path, optimizer=name)))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"orpo train: error: train.optimizer={name} needs CUDA (its state is paged in CUDA unified "
                       "memory) and this run is on cpu: use adamw_8bit or adamw")
    assert err[:-1] == ["engine: single process"]  # nothing loaded: no tokenizer, data or model line
    assert not out.exists()


def test_the_memory_estimate_knows_each_optimizers_state():
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024, bias=False), torch.nn.Linear(1024, 1024, bias=True))
    n = 2 * 1024 * 1024 + 1024
    engine = Engine(name="single", accelerator=SimpleNamespace(num_processes=1, device=torch.device("cpu")))

    def optim(name):
        return estimate_memory(model, engine, name).optimizer

    assert optim("adamw") == 2 * 4 * n
    # two uint8 moments + a float32 absmax per 256 for each matrix; the 1,024 bias (< 4,096) in float32
    assert optim("adamw_8bit") == optim("paged_adamw_8bit") == 2 * (2 * 2**20 + 8 * 2**12) + 8 * 1024
    assert optim("paged_adamw_32bit") == 8 * n
    assert optim("adafactor") == 4 * (2 * 2048 + 1024)  # a row and a column per matrix, the bias in full
    assert optim("lion") == 4 * n
    line = estimate_memory(model, engine, "adamw_8bit").line(engine)
    assert "AdamW 8-bit 4.1 MiB" in line


@pytest.mark.parametrize("name", ["adamw", "adafactor", pytest.param("adamw_8bit", marks=needs_bnb),
                                  pytest.param("lion", marks=needs_bnb)])
def test_the_estimate_is_the_state_the_optimizer_really_keeps(name):
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024, bias=False), torch.nn.Linear(1024, 1024, bias=True))
    opt = build_optimizer(model, TrainConfig(optimizer=name))
    model(torch.randn(2, 1024)).sum().backward()
    opt.step()
    # every state tensor but the step count and bitsandbytes' two 256-entry quantization maps
    real = sum(v.numel() * v.element_size() for state in opt.state.values() for k, v in state.items()
               if torch.is_tensor(v) and k not in ("step", "qmap1", "qmap2"))
    engine = Engine(name="single", accelerator=SimpleNamespace(num_processes=1, device=torch.device("cpu")))
    assert estimate_memory(model, engine, name).optimizer == real


def _lrs(total_steps, **train):
    """The learning rate of each optimizer step of a run of ``total_steps``, read off the optimizer."""
    param = torch.nn.Parameter(torch.zeros(2))
    cfg = TrainConfig(learning_rate=1.0, **train)
    opt = torch.optim.SGD([param], lr=cfg.learning_rate)
    scheduler = build_scheduler(opt, cfg, total_steps)
    lrs = []
    for _ in range(total_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


def test_cosine_with_min_lr_ends_at_the_floor():
    lrs = _lrs(12, lr_scheduler="cosine_with_min_lr", warmup_steps=2, min_lr_ratio=0.2)
    assert lrs[:3] == [0.0, 0.5, 1.0]
    # cosine from 1 to 0.2 over steps 2..12
    expected = [0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 10)) for s in range(2, 12)]
    assert lrs[2:] == pytest.approx(expected)
    assert min(lrs[2:]) > 0.2


def test_wsd_warms_up_holds_the_peak_then_decays_to_the_floor():
    lrs = _lrs(20, lr_scheduler="wsd", warmup_steps=4, decay_ratio=0.25, min_lr_ratio=0.1,
               lr_scheduler_kwargs={"decay_type": "linear"})
    assert lrs[:4] == pytest.approx([0.1, 0.325, 0.55, 0.775])  # transformers warms up from the floor
    assert lrs[4:15] == [1.0] * 11  # stable: 20 - 4 warmup - 5 decay
    assert lrs[15:] == pytest.approx([0.1 + 0.9 * (1 - k / 5) for k in range(5)])
    # the default decay is a cosine: another curve through the same ends
    cosine = _lrs(20, lr_scheduler="wsd", warmup_steps=4, decay_ratio=0.25, min_lr_ratio=0.1)
    assert cosine[:16] == lrs[:16] and cosine[16:] != pytest.approx(lrs[16:])


def test_scheduler_kwargs_reach_the_schedule_and_unknown_ones_are_named():
    restarts = _lrs(10, lr_scheduler="cosine", lr_scheduler_kwargs={"num_cycles": 1.0})
    assert restarts[5] == pytest.approx(0.0) and restarts[9] > 0.5  # a full cosine: down and back up
    with pytest.raises(ConfigError) as e:
        _lrs(10, lr_scheduler="wsd", lr_scheduler_kwargs={"decay": "linear"})
    assert ("train.lr_scheduler_kwargs: decay is not an argument of the wsd schedule (transformers' "
            "get_wsd_schedule); it accepts warmup_type, decay_type, num_cycles") in str(e.value)
    with pytest.raises(ConfigError, match="decay is not an argument of the linear schedule .* it accepts none"):
        _lrs(10, lr_scheduler_kwargs={"decay": 1})
    with pytest.raises(ConfigError, match="Unknown decay type"):
        _lrs(10, lr_scheduler="wsd", lr_scheduler_kwargs={"decay_type": "step"})


def test_wsd_longer_than_the_run_is_refused():
    with pytest.raises(ConfigError, match=r"wsd: 8 warmup \+ 3 decay steps .* more than the run's 10 steps"):
        _lrs(10, lr_scheduler="wsd", warmup_steps=8, decay_ratio=0.3)


def _without_timing(rows):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


class Interrupt(Exception):
    pass


def _stop_after_3(trainer):
    if trainer.state.step == 3:
        raise Interrupt


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("optimizer", "schedule"), [
    ("adamw", {"lr_scheduler": "cosine_with_min_lr", "min_lr_ratio": 0.3}),
    pytest.param("adamw_8bit", {"lr_scheduler": "wsd", "decay_ratio": 0.5, "optimizer_kwargs": {"min_8bit_size": 256}},
                 marks=needs_bnb),
    ("adafactor", {"lr_scheduler": "wsd", "warmup_steps": 1, "decay_ratio": 0.5}),
    pytest.param("lion", {"lr_scheduler": "cosine", "learning_rate": 1e-4}, marks=needs_bnb),
])
def test_a_resumed_run_equals_the_uninterrupted_one(optimizer, schedule, tmp_path, stories_dir, hh_path):
    """4 steps straight, and 3 steps stopped then resumed from step-2: the same metrics row for row
    (loss, grad norm, lr), the optimizer as asked, its state restored from the checkpoint."""

    def cfg(out, **extra):
        return load_config(raw=_raw(out, stories_dir, hh_path, optimizer=optimizer, **schedule, **extra))

    straight = Trainer(cfg(tmp_path / "a"), progress=False).setup()
    straight.train()
    assert type(straight.engine.torch_optimizer).__name__ == {"adamw": "AdamW", "adamw_8bit": "AdamW8bit",
                                                               "adafactor": "Adafactor", "lion": "Lion"}[optimizer]
    with pytest.raises(Interrupt):
        Trainer(cfg(tmp_path / "b"), progress=False, on_step_end=_stop_after_3).setup().train()
    resumed = Trainer(cfg(tmp_path / "b", resume="auto"), progress=False).setup()
    assert resumed.resume_from.name == "step-2"
    if optimizer == "adamw_8bit":
        assert any(s["state1"].dtype == torch.uint8 for s in resumed.engine.torch_optimizer.state.values())
    resumed.train()
    rows = _without_timing(read_metrics(tmp_path / "a"))
    assert _without_timing(read_metrics(tmp_path / "b")) == rows
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert len(lrs) == 4 and len(set(lrs)) > 1  # the schedule moved


@pytest.mark.usefixtures("one_thread")
def test_resume_with_another_optimizer_is_refused_and_an_older_checkpoint_means_adamw(tmp_path, stories_dir,
                                                                                      hh_path):
    out = tmp_path / "run"
    Trainer(load_config(raw=_raw(out, stories_dir, hh_path, max_steps=2)), progress=False).setup().train()
    other = load_config(raw=_raw(out, stories_dir, hh_path, max_steps=4, resume="auto", optimizer="adafactor"))
    with pytest.raises(ResumeError, match="train.optimizer: checkpoint 'adamw', now 'adafactor'"):
        Trainer(other, progress=False).setup()
    # a checkpoint written before train.optimizer existed was an AdamW run
    folder = out / "checkpoints" / "step-2"
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    del saved["train"]["optimizer"]
    (folder / "config.yaml").write_text(yaml.safe_dump(saved))
    fingerprint = ckpt.read_state(folder).data_fingerprint

    def check(cfg):
        return resume.check_resume_compatible(folder, cfg, fingerprint, 1, "single", lambda bs, n: 0)

    assert check(load_config(raw=_raw(out, stories_dir, hh_path, max_steps=4))).step == 2
    with pytest.raises(ResumeError, match="train.optimizer: checkpoint 'adamw', now 'adafactor'"):
        check(other)
