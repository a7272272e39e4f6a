"""``python -m ocspmint`` and the ``ocspmint`` console script (pyproject).

The script imports only this module: multiprocessing's "spawn" runs the
parent's main script again in every signer process it starts, and
``ocspmint.cli`` with its imports would cost each one ~40 ms before it
can log in. The CLI is imported when ``main`` runs.
"""


def main() -> int:
    from ocspmint.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
