"""What the command-line tools share: their help layout, and the check of
optional dependencies before any work starts.

Nothing here imports TensorFlow, so `--help` and usage errors answer at
once; a command imports `keras_bnp` (and with it TensorFlow) after
parsing.
"""

import argparse
import importlib


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks (its example commands) and adds
    each option's default to its help, lists as they are typed."""

    def _get_help_string(self, action):
        default = action.default
        if (default is None or isinstance(default, bool)
                or default is argparse.SUPPRESS):
            return action.help
        if isinstance(default, (list, tuple)):
            default = " ".join(map(str, default)) or "none"
        default = str(default).replace("%", "%%")
        return f"{action.help or ''} (default: {default})".strip()


def require(module, extra, purpose):
    """Raises `SystemExit` with the install command if `module` cannot be
    imported; `extra` names the keras-bnp extra that installs it."""
    try:
        importlib.import_module(module)
    except ImportError as error:
        raise SystemExit(
            f"error: {purpose} needs `{module}` ({error}). Install it with "
            f'`pip install "keras-bnp[{extra}]"` (or, in a clone, '
            f'`pip install -e ".[{extra}]"`).'
        ) from None
