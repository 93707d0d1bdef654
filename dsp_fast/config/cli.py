"""The fast trainer's command-line flags, made from `FastConfig`'s fields: one flag per field, its help the field's
docstring, its choices the field's own, so that a field added to the section is a flag too."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap

from dsp_fast.config.errors import _check
from dsp_fast.config.schema import Config, FastConfig

FLAG_NAMES = {"cuda_graphs": "graphs"}
"""Flags not spelled as their field (`--no-graphs` is fast.cuda_graphs false)."""


def field_docs(cls: type) -> dict[str, str]:
    """{field: the string literal under it in `cls`'s source}, whitespace folded to single spaces."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {a.target.id: " ".join(b.value.value.split()) for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """A flag per `fast:` field (None when not given: the preset's value stands): `--name VALUE`, and `--name` /
    `--no-name` for a boolean."""
    docs = field_docs(FastConfig)
    for f in dataclasses.fields(FastConfig):
        flag = "--" + FLAG_NAMES.get(f.name, f.name).replace("_", "-")
        # argparse formats help with %: a literal one is doubled
        kw = {"dest": f.name, "default": None, "help": f"fast.{f.name}: {docs[f.name]}".replace("%", "%%")}
        if f.type in ("bool", "bool | None"):  # None: unset, the field's own 'auto' (fast.tensorboard)
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            parser.add_argument(flag, type=type(f.default), choices=f.metadata.get("choices") or None, **kw)


def apply_cli_args(cfg: Config, args: argparse.Namespace) -> Config:
    """The config the fast trainer runs: the given flags written into its `fast:` section (the saved config says what
    ran) and checked with the rest, before anything is created; the one setting only the reference runs refused."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(FastConfig)
             if getattr(args, f.name, None) is not None}
    cfg = dataclasses.replace(cfg, fast=dataclasses.replace(cfg.fast, **given))
    _check(cfg.dsp.long_tail_search != "retry", "dsp.long_tail_search",
           "'retry' (the authors' host-side retry loop) is run by the reference trainer only (python -m "
           "dsp_fast.reference); the fast trainer's sampler draws the loop's distribution from counts ('counts')")
    return cfg
