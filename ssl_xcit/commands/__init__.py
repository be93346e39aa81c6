"""The command layer: argument parsers, flag names and the main(argv) of each command."""
