"""orpo: Odds Ratio Preference Optimization, from data to an aligned model in one training stage."""

import logging as _logging

# bitsandbytes (imported by peft whenever it is installed) looks up a 4-bit CPU kernel on the Hub at
# import and logs two warnings when it cannot have it; orpo never runs 4-bit on a CPU, so they would
# only be noise on every command.
for _name in ("bitsandbytes.backends.cpu.ops", "kernels"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
