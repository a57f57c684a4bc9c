"""``python -m lab doctor`` checks a setup; ``python -m lab student-version SRC DST``
writes exercise notebooks without their solutions (see ``lab.exercises.student``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("doctor", help="check Python, torch, widgets, threads and a training step")
    student = commands.add_parser("student-version", help="write notebooks without solutions")
    student.add_argument("source", help="an exercise notebook, or a folder of them")
    student.add_argument("destination", help="the folder to write the student notebooks to")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        from lab.doctor import doctor

        return 0 if doctor() else 1
    from lab.errors import LabError
    from lab.exercises.student import write_student_version

    try:
        written = write_student_version(args.source, args.destination)
    except LabError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
