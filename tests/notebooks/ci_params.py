"""The notebooks' test parameters are the library's small profile (also what `make demo` runs),
so CI checks exactly the settings a newcomer's first run uses."""

from drasclr_lib.runner import SMALL_PARAMS

CI_PARAMS: dict[str, dict] = SMALL_PARAMS
