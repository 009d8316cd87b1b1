"""The refinement methods, by ``--method`` name: a plain dict (STYLE points 6 and 12).

Adding a method: one new module that defines its parameters, its pure function and a
:class:`~clip_es.refine.method.RefineMethod` ``METHOD``, one line below, and a parameter
field of that type on :class:`~clip_es.refine.run.RefineConfig`.
"""

from __future__ import annotations

from clip_es.errors import ConfigError
from clip_es.refine import crf, pamr
from clip_es.refine.method import RefineMethod

METHODS: dict[str, RefineMethod] = {
    crf.METHOD.name: crf.METHOD,
    pamr.METHOD.name: pamr.METHOD,
}
#: The method ``clipes refine`` uses unless told (chosen by measurement: docs/refine.md).
DEFAULT_METHOD = "crf"


def get_method(name: str) -> RefineMethod:
    """The method called ``name``.

    Raises:
        ConfigError: unknown name (the message lists the valid ones).
    """
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {name!r}") from None
