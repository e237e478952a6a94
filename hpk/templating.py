"""The one Jinja2 environment for every template hpk renders.

StrictUndefined turns a missing value into an error instead of an empty string, and the
`sh` filter shell-quotes a value for templates that produce scripts.
"""

from __future__ import annotations

import shlex
from functools import cache

import jinja2

from hpk.paths import templates_dir


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # noqa: S701 - the output is config files and scripts, not HTML
    )
    env.filters["sh"] = lambda value: shlex.quote(str(value))
    return env


def render(name: str, **context: object) -> str:
    return environment().get_template(name).render(**context)
