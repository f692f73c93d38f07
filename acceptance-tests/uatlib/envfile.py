"""Parse the `export VAR=value` files of config/tests-uat/<name>/config and the stack's env file, without a shell."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
_NAME = re.compile(r"^[A-Za-z_]\w*$")


class EnvFileError(ValueError):
    """A line of an env file is not `[export ]NAME=value`."""


def _expand(value: str, env: dict[str, str]) -> str:
    # Like the shell: $VAR and ${VAR}; an unset variable expands to "".
    return _VAR.sub(lambda m: env.get(m.group(1) or m.group(2), ""), value)


def _value(raw: str, env: dict[str, str]) -> str:
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] == "'":
        return raw[1:-1]  # single quotes: literal, as in the shell
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        raw = raw[1:-1]
    return _expand(raw, env)


def parse_env_lines(lines: list[str], env: dict[str, str], source: str,
                    on_var: dict[str, object] | None = None) -> dict[str, str]:
    """Apply `export NAME=value` lines to a copy of env and return it.

    :param on_var: hooks called as ``hook(value, env)`` right after NAME is set (used for BMI_STACK_ENV), so that
        later lines of the same file can override what the hook loaded.
    :raises EnvFileError: on a line that is not an assignment.
    """
    out = dict(env)
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.startswith("export "):
            text = text[len("export "):].strip()
        name, sep, raw = text.partition("=")
        if not sep or not _NAME.match(name):
            raise EnvFileError(f"{source}:{number}: expected `export NAME=value`, got {line.strip()!r}")
        out[name] = _value(raw, out)
        hook = (on_var or {}).get(name)
        if hook is not None:
            out = hook(out[name], out)  # type: ignore[operator]
    return out


def parse_env_file(path: Path, env: dict[str, str], on_var: dict[str, object] | None = None) -> dict[str, str]:
    return parse_env_lines(path.read_text(encoding="utf-8").splitlines(), env, str(path), on_var)


def stack_env_path(value: str, env: dict[str, str], repo: Path) -> Path:
    """Where the stack's env file is: an explicit path, or for `auto` $BMI_STACK_DIR/env, else what
    `scripts/bmi-stack env` prints."""
    if value != "auto":
        return Path(value)
    stack_dir = env.get("BMI_STACK_DIR") or os.environ.get("BMI_STACK_DIR")
    if stack_dir:
        return Path(stack_dir) / "env"
    proc = subprocess.run([str(repo / "scripts" / "bmi-stack"), "env"], capture_output=True, text=True,
                          timeout=60, check=False)
    path = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if not path:
        raise EnvFileError(f"`scripts/bmi-stack env` printed no path: {proc.stderr.strip()}")
    return Path(path)


def load_config(config: Path, repo: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a test run: base (os.environ) + the config file, with BMI_STACK_ENV expanded in place.

    :raises EnvFileError: bad line, or the stack env file is missing (the stack is not up).
    """
    def load_stack(value: str, env: dict[str, str]) -> dict[str, str]:
        path = stack_env_path(value, env, repo)
        if not path.is_file():
            raise EnvFileError(f"the stack env file {path} does not exist: is the stack up "
                               "(scripts/bmi-stack up)? Set BMI_STACK_DIR to the stack's --dir.")
        return parse_env_file(path, env)

    return parse_env_file(config, dict(os.environ if base is None else base), {"BMI_STACK_ENV": load_stack})
