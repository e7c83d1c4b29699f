"""One error convention for every command line of the package.

Every CLI (``train.py``, ``python -m halluvit_jax.evaluate``, ``convert``, ``analysis``,
``complexity``, ``data.prepare``) runs its ``main`` through :func:`run_main`: an ordinary
mistake prints exactly one line ``error: <what> ... <how to fix>`` on stderr and exits with

* 2 for usage errors (bad flags, a misspelled config path, an unknown config field),
* 1 for runtime errors (a missing checkpoint or dataset, a diverged run, ...),
* 130 when interrupted (Ctrl-C).

A traceback is printed only with ``--debug`` (or ``HALLUVIT_DEBUG=1``) and for genuine bugs.
Raise :class:`UsageError` / :class:`UserError` (or any subclass, with ``exit_code``) for mistakes
a user can fix; exceptions listed in :data:`USER_ERRORS` are treated the same way.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import os
import sys
import traceback
import types
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags
from ml_collections import config_flags

DEBUG_ENV = "HALLUVIT_DEBUG"


class UserError(Exception):
    """A mistake the user can fix; printed as one ``error:`` line, exit status ``exit_code``.

    An empty message prints nothing (the caller has already said what happened).
    """

    exit_code = 1


class UsageError(UserError):
    """A bad command line: unknown flag or config field, missing config file, ... (exit 2)."""

    exit_code = 2


class Interrupted(UserError):
    """The run was interrupted (SIGINT) after saving what it could (exit 130)."""

    exit_code = 130


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that are user mistakes wherever they come from (one line, exit 1)."""
    types: list[type[BaseException]] = [UserError, FileNotFoundError, FileExistsError, NotADirectoryError,
                                         IsADirectoryError, PermissionError, FloatingPointError]
    return tuple(types)


def one_line(err: BaseException | str) -> str:
    """``err``'s message on one line (whitespace collapsed; an inner traceback dropped)."""
    text = str(err)
    if "Traceback (most recent call last)" in text:  # absl wraps errors of config files
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        text = lines[-1] if lines else text
        head, sep, rest = text.partition(": ")
        if sep and head.isidentifier() and head.endswith(("Error", "Exception")):
            text = rest  # 'ValueError: msg' -> 'msg'
    text = " ".join(text.split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":  # KeyError('...') quoting
        text = text[1:-1]
    return text


def clause(err: BaseException | str) -> str:
    """:func:`one_line` without a final period, to continue the sentence (``...; how to fix``)."""
    return one_line(err).rstrip(".")


def debug_requested(argv: Sequence[str] | None) -> bool:
    return bool(argv and "--debug" in argv) or os.environ.get(DEBUG_ENV, "") not in ("", "0", "false")


def run_main(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None, *,
             user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Runs ``main(argv)`` (``argv`` without ``--debug``) and turns mistakes into one line.

    ``main`` returns an exit status (``None`` means 0). ``user_errors``: extra exception types
    that are user mistakes for this CLI (e.g. ``ValueError`` where only input can cause it).
    Returns the exit status; callers do ``sys.exit(run_main(main))``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        status = main(argv)
        return 0 if status is None else int(status)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("error: interrupted (Ctrl-C); nothing was saved by this step; re-run the command to resume.",
              file=sys.stderr)
        return 130
    except SystemExit as err:  # argparse: usage errors exit 2, --help exits 0
        return err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    except (*_user_error_types(), *user_errors) as err:
        if debug:
            traceback.print_exc()
        message = one_line(err)
        if message:
            print(f"error: {message}", file=sys.stderr)
        return int(getattr(err, "exit_code", 1))


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one :class:`UsageError` line (exit 2)
    instead of the usage text plus an error line; subcommand parsers inherit it."""

    def error(self, message: str):
        raise UsageError(f"{message.rstrip('.')} (see {self.prog} --help)")


def close_matches(word: str, candidates: Sequence[str], n: int = 1) -> list[str]:
    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.6)


def did_you_mean(word: str, candidates: Sequence[str]) -> str:
    """' (did you mean X?)' or '' -- plain text, for an error line."""
    match = close_matches(word, candidates)
    return f"; did you mean {match[0]}?" if match else ""


# ---------------------------------------------------------------------------------------------
# FIELD=VALUE overrides: ``--set`` (convert, analysis) and ``--config.FIELD=VALUE`` on a JSON
# config (evaluate).


def parse_value(text: str) -> Any:
    """One override value: a Python literal (``4``, ``0.5``, ``(1, 1, 1, 1)``, ``None``,
    ``'ihh'``, ``True``), else JSON's ``true`` / ``false`` / ``null``, else the text itself as
    a string (``ihh``). Surrounding whitespace is dropped."""
    text = text.strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    return {"true": True, "false": False, "null": None}.get(text, text)


def parse_set(items: Sequence[str] | None, flag: str = "--set") -> dict[str, Any]:
    """``['depth=4', 'hal_variant=chh', 'depths=(1,1,1,1)']`` -> ``{'depth': 4, 'hal_variant':
    'chh', 'depths': (1, 1, 1, 1)}``: the one ``FIELD=VALUE`` parser of the command lines (values
    by :func:`parse_value`; a later item wins). A missing ``=`` or field is a :class:`UsageError`."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"bad {flag} {item!r}; write FIELD=VALUE, e.g. {flag} depth=4")
        out[key.strip()] = parse_value(value)
    return out


# ---------------------------------------------------------------------------------------------
# absl / ml_collections flags (train.py, evaluate).


def config_path_arg(argv: Sequence[str], name: str = "config") -> str | None:
    """The value of ``--config=X`` / ``--config X`` in ``argv`` (None if absent)."""
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def override_args(argv: Sequence[str], name: str = "config") -> list[tuple[str, str]]:
    """``[(dotted field, raw argument)]`` of every ``--config.FIELD[=VALUE]`` in ``argv``."""
    out = []
    for a in argv:
        if a.startswith(f"--{name}.") or a.startswith(f"--no{name}."):
            field = a.split("=", 1)[0].split(".", 1)[1]
            out.append((field, a))
    return out


def config_fields(config: Any, prefix: str = "") -> list[str]:
    """Every dotted field path of a ConfigDict (sub-dicts and their leaves)."""
    out = []
    for key in sorted(config.keys()):
        path = f"{prefix}{key}"
        out.append(path)
        value = config[key]
        if hasattr(value, "keys") and callable(value.keys):
            out.extend(config_fields(value, path + "."))
    return out


def check_config_overrides(config: Any, argv: Sequence[str], name: str = "config") -> None:
    """Raises :class:`UsageError` for a ``--config.FIELD`` that is not a field of ``config``."""
    fields = config_fields(config)
    known = set(fields)
    for field, arg in override_args(argv, name):
        if field not in known:
            raise UsageError(
                f"unknown config field {field} in {arg}{did_you_mean(field, fields)} "
                "(`python train.py --help` lists the main fields)"
            )


def check_config_file(path: str | None, configs_dir: str | None = None) -> None:
    """Raises :class:`UsageError` if ``path`` (``FILE[:ARGS]``) names no file."""
    if path is None:
        return
    file = path.split(":", 1)[0]
    if os.path.isfile(file):
        return
    hint = ""
    if configs_dir and os.path.isdir(configs_dir):
        presets = available_configs(configs_dir)
        base = os.path.splitext(os.path.basename(file))[0]
        match = close_matches(base, [os.path.splitext(os.path.basename(p))[0] for p in presets])
        hint = (f"; did you mean configs/{match[0]}.py?" if match else
                f"; presets: {', '.join(os.path.basename(p) for p in presets)}")
    raise UsageError(f"config file {file!r} does not exist{hint}")


def load_config_module(path: str, *, relative_to: str | None = None) -> types.ModuleType:
    """The config file ``path`` as a module (relative to the directory of ``relative_to``, a
    config's ``__file__``, when given)."""
    if relative_to is not None:
        path = os.path.join(os.path.dirname(os.path.abspath(relative_to)), path)
    path = os.path.normpath(os.path.abspath(path))
    name = "_halluvit_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"config file {path!r} does not exist or is not a .py file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(path: str, arg: str | None = None, *, relative_to: str | None = None) -> Any:
    """``get_config(arg)`` of the config file ``path`` (``"configs/demo.py"``, or ``"demo.py"``
    with ``relative_to=__file__`` inside a config). ``path`` may carry the argument itself, as on
    the command line: ``"configs/demo.py:ci"``."""
    if arg is None and ":" in os.path.basename(path):
        path, _, arg = path.rpartition(":")
    return load_config_module(path, relative_to=relative_to).get_config(arg)


def available_configs(configs_dir: str) -> list[str]:
    """The ``*.py`` presets of ``configs_dir`` and its sub-directories, relative to its parent."""
    out = []
    for root, dirs, files in os.walk(configs_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith(("_", ".")))
        for f in sorted(files):
            if f.endswith(".py") and not f.startswith("_"):
                out.append(os.path.relpath(os.path.join(root, f), os.path.dirname(configs_dir)))
    return out


def parse_absl_flags(argv: Sequence[str], define: Callable[[Any, list[str]], Any], *,
                     config_name: str = "config", configs_dir: str | None = None,
                     prog: str = "prog") -> Any:
    """Parses ``argv`` (without the program name) with flags that ``define(flag_values, sys_argv)``
    declares on a fresh ``FlagValues`` (so ``main(argv)`` can run many times in one process).

    Returns ``define``'s result. Every parse error -- an unknown flag, a missing config file, an
    unknown ``--config.FIELD`` (with the close match), a bad value, a failing ``get_config`` --
    becomes one :class:`UsageError` line.
    """
    full = [prog, *argv]
    path = config_path_arg(argv, config_name)
    check_config_file(path, configs_dir)
    overrides = override_args(argv, config_name)
    if path is not None and overrides:
        # First the config alone, to name an unknown --config.FIELD with its close match.

        fv0 = flags.FlagValues()
        only = [prog, f"--{config_name}={path}"]
        holder = config_flags.DEFINE_config_file(config_name, None, "", flag_values=fv0, sys_argv=only)
        try:
            fv0(only)
            config = holder.value
        except (flags.Error, OSError, AttributeError, ValueError) as err:
            raise UsageError(f"--{config_name}={path}: {clause(err)}") from None
        if config is not None:
            check_config_overrides(config, argv, config_name)
    fv = flags.FlagValues()
    handles = define(fv, full)
    try:
        rest = fv(full)
    except flags.Error as err:
        if "Error whilst parsing config file" in str(err):
            raise UsageError(f"--{config_name}={path}: {clause(err)}") from None
        raise UsageError(f"{clause(err)} (see {prog} --help)") from None
    except (OSError, AttributeError, KeyError, ValueError, TypeError) as err:  # config_flags
        raise UsageError(f"bad --{config_name}: {clause(err)}") from None
    if len(rest) > 1:
        raise UsageError(f"unexpected argument(s) {' '.join(rest[1:])}; flags are --name=value "
                         f"(see {prog} --help)")
    return handles
