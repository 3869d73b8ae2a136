"""What every `python -m ppow_jax.*` entry point shares: errors as one line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
from typing import Any, Callable, Optional, Sequence

from ppow_jax.errors import PPOWError


def enable_compilation_cache() -> None:
    """Persists compiled XLA programs across runs (`PPOW_JAX_CACHE_DIR`, default ~/.cache/ppow_jax/xla).

    The 30-layer target takes about a minute per shape bucket to compile on a CPU; evals and
    training runs with the same shapes then start in seconds. `PPOW_JAX_CACHE_DIR=` (empty) turns it off.
    """
    import jax

    directory = os.environ.get("PPOW_JAX_CACHE_DIR", str(pathlib.Path.home() / ".cache" / "ppow_jax" / "xla"))
    if directory:
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


MATMUL_PRECISIONS = ("highest", "default")


def add_matmul_precision_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--matmul-precision", choices=MATMUL_PRECISIONS, default="highest",
                        help="float32 matmuls: 'highest' (full float32, so that a verify pass and a decode step "
                             "round alike and greedy speculative outputs equal plain decoding's) or 'default' (the "
                             "backend's: TF32 on NVIDIA GPUs, bfloat16 passes on TPUs; faster there, but greedy "
                             "outputs can part from plain decoding's at near-ties). Meant for float32 weights; "
                             "no effect on a CPU.")


def matmul_precision(name: str) -> contextlib.AbstractContextManager:
    """The context in which traced programs use `name` ('highest' or the backend's 'default') for float32
    matmuls, whatever JAX_DEFAULT_MATMUL_PRECISION says.

    On an H200, at K = 4, 'default' (TF32) gave 4 of 50 greedy eval turns that differ from plain
    decoding, full float32 none (BENCHMARKS.md, "On a GPU"): TF32 products round differently for a
    verify pass over K+1 rows than for a decode step over one.
    """
    import jax

    return jax.default_matmul_precision(name)


def load_config_file(path: str | pathlib.Path):
    """`get_config()` of a configs/*.py file, for tools that take a config path as a plain argument."""
    import importlib.util

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config file {path}")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def sibling_config(config_file: str, name: str):
    """The config of `name` (a .py file beside `config_file`), for configs that start from another."""
    return load_config_file(pathlib.Path(config_file).with_name(name))


def run_entry_point(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int],
                    argv: Optional[Sequence[str]] = None) -> int:
    """Parses flags and runs; bad input exits 2, NaN logits exit 1, each with `error: ...` on stderr."""
    args = parser.parse_args(argv)
    return _run_reporting_errors(lambda: run(args))


def _run_reporting_errors(run: Callable[[], int]) -> int:
    """Runs with the compilation cache on; bad input exits 2 and NaN logits exit 1, each as one line."""
    enable_compilation_cache()
    try:
        return run()
    except PPOWError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # the model produced NaN logits
        print(f"error: {err}", file=sys.stderr)
        return 1


def run_config_entry_point(main: Callable[[Any], int], argv: Optional[Sequence[str]] = None,
                           doc: str = "") -> int:
    """Entry points driven by an ml-collections config: `--config FILE [--config.KEY=VALUE ...]`.

    Flags are parsed by absl's config_flags (the ml-collections convention); errors are handled as
    in `run_entry_point`.
    """
    argv = list(sys.argv if argv is None else [sys.argv[0], *argv])
    # config_flags reads `--config.KEY` overrides from sys.argv, so it must hold these arguments.
    saved_argv, sys.argv = sys.argv, argv
    try:
        return _run_with_config(main, argv, doc)
    finally:
        sys.argv = saved_argv


def _config_path(args: Sequence[str]) -> Optional[str]:
    """The file of `--config FILE` or `--config=FILE` (absl also takes one dash), without config_flags'
    optional `:ARGS` suffix."""
    for i, arg in enumerate(args):
        name, equals, value = arg.partition("=")
        if name not in ("--config", "-config"):
            continue
        if not equals:
            if i + 1 == len(args):
                return None
            value = args[i + 1]
        return value if pathlib.Path(value).is_file() else value.split(":", 1)[0]
    return None


def _override_naming(argv: Sequence[str], key: object) -> Optional[str]:
    """The dotted path of the first `--config.A.B=V` override that names `key` (config_flags reports the key
    alone), or None when no override names it."""
    for arg in argv:
        for prefix in ("--config.", "-config."):
            if arg.startswith(prefix):
                dotted = arg[len(prefix):].partition("=")[0]
                if str(key).strip("'") in dotted.split("."):
                    return repr(dotted)
    return None


def _run_with_config(main: Callable[[Any], int], argv: list[str], doc: str) -> int:
    import ml_collections
    from absl import flags
    from ml_collections import config_flags

    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "path to a configs/*.py file", flag_values=flag_values,
                                    lock_config=True)
    if any(a in ("-h", "--help") for a in argv[1:]):
        print(doc or main.__doc__ or "")
        print("flags: --config FILE [--config.KEY=VALUE ...]")
        return 0
    path = _config_path(argv[1:])
    if path is None:
        print("error: --config FILE is required", file=sys.stderr)
        return 2
    if not pathlib.Path(path).is_file():
        print(f"error: no config file {path}", file=sys.stderr)
        return 2
    try:
        flag_values(argv)  # runs the config file and applies the --config.KEY overrides
        config = flag_values.config
    except flags.Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # the config file is user code: a syntax error, a failed import, ...
        # config_flags reports an unknown override key as a KeyError, or an AttributeError around one; its
        # text may add ml_collections' suggestion ("'key'\nDid you mean ...?").
        missing = err.args[0] if isinstance(err, AttributeError) and err.args else err
        if isinstance(missing, KeyError) and missing.args:
            missing = missing.args[0]
        key, _, hint = missing.partition("\n") if isinstance(missing, str) else (None, "", "")
        if key is not None and (dotted := _override_naming(argv, key)):
            print(f"error: unknown config key {dotted}" + (f" ({hint.strip()})" if hint.strip() else ""),
                  file=sys.stderr)
        else:
            print(f"error: --config {path} and its overrides: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    if config is None:
        print(f"error: config file {path}: get_config() returned None", file=sys.stderr)
        return 2
    if not isinstance(config, ml_collections.ConfigDict):  # config_flags keeps some load errors for later
        error = getattr(config, "_error", None)
        print(f"error: config file {path} could not be loaded: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    return _run_reporting_errors(lambda: main(config))
