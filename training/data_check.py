"""`wsss data check`: read every file of a dataset folder once and report every problem.

Training stops at the first bad file it meets (`training.data` raises `DataError` naming it);
a check of a whole dataset should not make a user fix 3 files in 3 runs. `check_dataset`
reads every image and mask, collects each problem with its file, and groups them by kind, so
a folder of 2,500 files with 3 bad ones gets one report naming the 3.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.data import IMAGE_EXTENSIONS, MASK_SUFFIX, _images_in, read_image, read_mask
from training.errors import DataError

# Each kind of problem, with what was expected instead (the heading of its group in the report).
PROBLEMS: dict[str, str] = {
    "empty_folder": f"a folder holding images ({' '.join(IMAGE_EXTENSIONS)})",
    "unreadable_image": "a readable 8-bit image with 1, 3 or 4 channels, of at most 50 M pixels",
    "image_without_mask": f"a smoke mask test/masks/<stem>{MASK_SUFFIX} for every test image",
    "mask_without_image": "a test image test/images/<stem>.* for every mask",
    "mask_size": "a mask of the same size as its image",
    "mask_values": "a binary mask: one channel (or three equal ones), values {0, 255} or {0, 1}",
    "no_smoke_in_test": "at least one test mask with smoke: smoke IoU is undefined without one",
}
SHOWN_PER_KIND = 5  # paths listed under each kind; the count says how many more


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file or folder.

    Attributes:
        kind: a key of `PROBLEMS`.
        path: the file or folder.
        detail: what was found (the reader's message, without the path).
    """

    kind: str
    path: Path
    detail: str = ""


@dataclass
class DatasetReport:
    """What `check_dataset` read and found.

    Attributes:
        root: the dataset folder.
        summary: {"train": {"smoke": n, "clean": n}, "test": {"images", "smoke", "clean",
            "with_context"}, "sizes": {"train": {"W×H": n}, "test": {...}}}.
        problems: every problem found, in the order files were read.
        files: how many files were read.
    """

    root: Path
    summary: dict[str, Any]
    problems: list[Problem] = field(default_factory=list)
    files: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def grouped(self) -> dict[str, list[Problem]]:
        """Problems by kind, kinds in the order of `PROBLEMS`."""
        by_kind: dict[str, list[Problem]] = defaultdict(list)
        for problem in self.problems:
            by_kind[problem.kind].append(problem)
        return {kind: by_kind[kind] for kind in PROBLEMS if kind in by_kind}

    def render(self) -> str:
        """The report a person reads: counts, then each kind of problem with its first files."""
        s = self.summary
        lines = [
            f"{self.root}: {self.files} files read; train {s['train']['smoke']} smoke + {s['train']['clean']} "
            f"clean, test {s['test']['images']} images ({s['test']['smoke']} with smoke, "
            f"{s['test']['with_context']} with a context mask)",
        ]
        if self.ok:
            return "\n".join([*lines, "no problems found"])
        lines.append(f"{len(self.problems)} problem(s) in {len({p.path for p in self.problems})} file(s):")
        for kind, found in self.grouped().items():
            lines.append(f"  {kind.replace('_', ' ')}: {len(found)} (expected {PROBLEMS[kind]})")
            for problem in found[:SHOWN_PER_KIND]:
                lines.append(f"    {self._relative(problem.path)}{': ' + problem.detail if problem.detail else ''}")
            if len(found) > SHOWN_PER_KIND:
                lines.append(f"    … and {len(found) - SHOWN_PER_KIND} more")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        problems = {kind: [str(p.path) for p in found] for kind, found in self.grouped().items()}
        return self.summary | {"files": self.files, "problems": problems}

    def _relative(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)


def check_dataset(root: Path) -> DatasetReport:
    """Read every file of the dataset at ``root`` (layout in `training.data`) and collect problems.

    Never raises for a bad file: each one becomes a `Problem`. Files that cannot be checked
    because another one is broken (the mask of an unreadable image) are not counted twice.
    """
    root = Path(root).resolve()
    report = DatasetReport(root, {})
    train = _check_train(root, report)
    test = _check_test(root, report)
    report.summary = {"train": train["counts"], "test": test["counts"], "sizes": {"train": train["sizes"],
                      "test": test["sizes"]}}  # fmt: skip
    return report


def _images_or_problem(folder: Path, report: DatasetReport) -> list[Path]:
    files = _images_in(folder)
    if not files:
        state = "is empty" if folder.is_dir() else "does not exist"
        report.problems.append(Problem("empty_folder", folder, f"the folder {state}"))
    return files


def _read(path: Path, report: DatasetReport, reader, **kwargs):
    """The reader's result, or None after recording the problem it raised."""
    report.files += 1
    try:
        return reader(path, **kwargs)
    except DataError as err:
        detail = str(err).removeprefix(f"{path}: ")
        report.problems.append(Problem(err.kind or "unreadable_image", path, detail))
        return None


def _check_train(root: Path, report: DatasetReport) -> dict[str, Any]:
    counts, sizes = Counter(smoke=0, clean=0), Counter()
    for label in ("smoke", "clean"):
        for path in _images_or_problem(root / "train" / label, report):
            rgb = _read(path, report, read_image)
            if rgb is not None:
                counts[label] += 1
                sizes[f"{rgb.shape[1]}×{rgb.shape[0]}"] += 1
    return {"counts": dict(counts), "sizes": dict(sizes)}


def _check_test(root: Path, report: DatasetReport) -> dict[str, Any]:
    test = root / "test"
    counts, sizes = Counter(images=0, smoke=0, clean=0, with_context=0), Counter()
    images = _images_or_problem(test / "images", report)
    stems = {p.stem for p in images}
    for image in images:
        rgb = _read(image, report, read_image)
        mask_path = test / "masks" / f"{image.stem}{MASK_SUFFIX}"
        if not mask_path.is_file():
            report.problems.append(Problem("image_without_mask", image, f"no {mask_path.relative_to(root)}"))
        if rgb is None:
            continue
        counts["images"] += 1
        sizes[f"{rgb.shape[1]}×{rgb.shape[0]}"] += 1
        if mask_path.is_file():
            mask = _read(mask_path, report, read_mask, shape=rgb.shape[:2], image=image)
            if mask is not None:
                counts["smoke" if mask.any() else "clean"] += 1
        context = test / "context" / f"{image.stem}{MASK_SUFFIX}"
        if context.is_file() and _read(context, report, read_mask, shape=rgb.shape[:2], image=image) is not None:
            counts["with_context"] += 1
    for folder in ("masks", "context"):
        for orphan in sorted(p for p in _images_in(test / folder) if p.stem not in stems):
            report.problems.append(Problem("mask_without_image", orphan, f"no test/images/{orphan.stem}.*"))
    if counts["clean"] and not counts["smoke"]:
        detail = f"none of the {counts['clean']} masks read has a smoke pixel"
        report.problems.append(Problem("no_smoke_in_test", test / "masks", detail))
    return {"counts": dict(counts), "sizes": dict(sizes)}
