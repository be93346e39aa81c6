"""The command layer: argument parsers, flag names and main(argv) of each command."""
