"""The command-line programs behind tools/*.py, here so that tests drive them as users do (main(argv)) and
tools/ stays a set of two-line entry points."""
