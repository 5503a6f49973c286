"""Check a site's data folder before the site joins a run, locally.

    python -m client.check_data FOLDER [--resolution R] [--site-dataset-size N]

During a run a site leaves out, as absent, every image it cannot use (unreadable,
truncated, too large, unsupported, resolving outside the folder, with a malformed or
contradictory caption) and every later copy of an image, and logs that only on the site
(see :func:`common.data.load_site_images`). This command lists every such problem with its
file, plus those of the folder as a whole and a count of usable images above the declared
public bound, so that the site can fix its data before anything is released. It prints to
the site's own terminal and sends nothing anywhere. Exit status: 0 if the folder is clean,
1 if there is any problem, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from common.config import RunConfig
from common.data import RecordProblem, SiteDataError, load_site_images


@dataclass(frozen=True)
class DataReport:
    """What :func:`check_folder` found: the number of usable images and every problem."""

    folder: str
    usable: int
    problems: tuple[RecordProblem, ...]

    @property
    def clean(self) -> bool:
        return not self.problems


def check_folder(folder: str | Path, *, resolution: int, site_dataset_size: int | None = None) -> DataReport:
    """Load ``folder`` as a site would and list every problem: the folder's own (missing,
    not a directory, unusable ``captions.json``, no usable image), each image or caption
    entry left out, and a usable count above ``site_dataset_size`` (the declared public
    bound on one site's images the privacy accounting rests on), when given."""
    folder = Path(folder)
    try:
        images = load_site_images(folder, site=folder.name, resolution=resolution)
    except SiteDataError as err:
        return DataReport(str(folder), 0, (RecordProblem(err.path, err.problem),))
    problems = list(images.skipped)
    if not images.names:
        problems.append(RecordProblem(str(folder), "holds no usable image: the site would train on nothing"))
    if site_dataset_size is not None and len(images) > site_dataset_size:
        problems.append(RecordProblem(str(folder), f"holds {len(images)} usable images, more than the declared "
                                                   f"site-dataset-size {site_dataset_size}: the privacy accounting "
                                                   "would not hold"))
    return DataReport(str(folder), len(images), tuple(problems))


def format_report(report: DataReport) -> str:
    """The report as lines for the site's terminal: one per problem, then a summary."""
    lines = [f"problem: {problem}" for problem in report.problems]
    status = "clean" if report.clean else f"{len(report.problems)} problem(s)"
    lines.append(f"{report.folder}: {report.usable} usable image(s), {status}")
    return "\n".join(lines)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Check the folder named on the command line; return the exit status (0 clean, 1 problems)."""
    parser = argparse.ArgumentParser(prog="python -m client.check_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="the site's data folder")
    parser.add_argument("--resolution", type=_positive, default=RunConfig().resolution,
                        help="side of the square images the run trains on (default: %(default)s)")
    parser.add_argument("--site-dataset-size", type=_positive, default=None,
                        help="the run's declared public bound on one site's images (checked if given)")
    args = parser.parse_args(argv)
    report = check_folder(args.folder, resolution=args.resolution, site_dataset_size=args.site_dataset_size)
    print(format_report(report))
    return 0 if report.clean else 1


if __name__ == "__main__":
    sys.exit(main())
