"""``python -m ssl_xcit.publish``: the command :mod:`ssl_xcit.commands.publish` (its parser and words)."""
from ssl_xcit.commands.publish import run_as_script

if __name__ == "__main__":
    run_as_script()
