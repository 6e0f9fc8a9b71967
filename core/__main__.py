try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while the command line's own modules import: nothing was written yet
    import sys

    sys.stderr.write("interrupted: finished outputs are intact; partial ones were not written\n")
    raise SystemExit(130) from None

main()
