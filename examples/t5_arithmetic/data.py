"""Arithmetic question/answer data: DeepMind's generator (offline, seeded, cached) or released files.

Every split is stored in the format of the released ``mathematics_dataset-v1.0`` text files: a
question line followed by its answer line. The tasks:

- ``add_sub_multiple`` (the paper's): train = ``train-*/arithmetic__add_sub_multiple``
  (entropy 3-10), interpolate = ``interpolate/arithmetic__add_sub_multiple`` (entropy 8),
  extrapolate = ``extrapolate/arithmetic__add_sub_multiple_longer`` (longer expressions).
- ``add_or_sub_small`` (the CPU demo's): two-operand ``add_or_sub`` at entropy 1-3 (small
  integers and decimals, e.g. ``What is -12 - 11?``, ``0.3 + 7``) for train and interpolate; its
  extrapolate split draws from entropy 4-5 (longer operands than most in training).

- the integer tasks in ``INTEGER_TASKS`` (the CPU demo's), generated directly from a seeded
  ``numpy`` generator: ``What is 347 - 6?``, the first operand up to a given size, the second
  smaller; the extrapolate split's first operand has one digit more than any in training.

Interpolate and extrapolate questions that also occur in the training set are removed.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

Pairs = List[Tuple[str, str]]
SPLITS = ("train", "interpolate", "extrapolate")

# Released file names per task: (train files, interpolate file, extrapolate file).
RELEASED_FILES = {
    "add_sub_multiple": (
        [f"train-{level}/arithmetic__add_sub_multiple.txt" for level in ("easy", "medium", "hard")],
        "interpolate/arithmetic__add_sub_multiple.txt",
        "extrapolate/arithmetic__add_sub_multiple_longer.txt",
    ),
    "add_or_sub": (
        [f"train-{level}/arithmetic__add_or_sub.txt" for level in ("easy", "medium", "hard")],
        "interpolate/arithmetic__add_or_sub.txt",
        "extrapolate/arithmetic__add_or_sub_big.txt",
    ),
}
# name: (largest first operand, largest second operand) of ``a + b`` / ``a - b`` questions, the
# operands uniform on [0, largest]. The extrapolate split's first operand is uniform on
# (largest, 10·largest], one digit longer.
INTEGER_TASKS = {"add_sub_3by1": (999, 9), "add_sub_3by2": (999, 99), "add_sub_2by2": (99, 99)}
TASKS = ("add_or_sub_small", "add_sub_multiple") + tuple(INTEGER_TASKS)


@dataclass
class ArithmeticData:
    train: Pairs
    interpolate: Pairs
    extrapolate: Pairs

    def split(self, name: str) -> Pairs:
        return getattr(self, name)


def _import_generator():
    """Import ``mathematics_dataset``'s arithmetic module, re-exporting what sympy >= 1.13 moved."""
    package = importlib.import_module("sympy.solvers.diophantine")
    if not hasattr(package, "base_solution_linear"):
        inner = importlib.import_module("sympy.solvers.diophantine.diophantine")
        package.base_solution_linear = inner.base_solution_linear
    from mathematics_dataset import generate_settings
    from mathematics_dataset.modules import arithmetic
    from mathematics_dataset.util import composition

    return arithmetic, composition, generate_settings


def _sample(module: Callable, count: int, settings) -> Pairs:
    """``count`` problems, dropping over-long ones as the official generator does."""
    pairs: Pairs = []
    while len(pairs) < count:
        problem = module()
        question, answer = str(problem.question), str(problem.answer)
        if len(question) > settings.MAX_QUESTION_LENGTH or len(answer) > settings.MAX_ANSWER_LENGTH:
            continue
        pairs.append((question, answer))
    return pairs


def _modules(task: str) -> Dict[str, Callable]:
    arithmetic, composition, _ = _import_generator()
    if task == "add_sub_multiple":
        levels = [arithmetic.train(_entropy_level(level, 3))["add_sub_multiple"] for level in range(3)]
        return {
            "train": levels,
            "interpolate": arithmetic.test()["add_sub_multiple"],
            "extrapolate": arithmetic.test_extra()["add_sub_multiple_longer"],
        }
    if task == "add_or_sub_small":
        def add_or_sub(low: float, high: float) -> Callable:
            args = composition.PreSampleArgs(1, 1, low, high)
            return lambda: arithmetic.add_or_sub(None, args)

        return {"train": [add_or_sub(1, 3)], "interpolate": add_or_sub(1, 3), "extrapolate": add_or_sub(4, 5)}
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def _entropy_level(level: int, levels: int) -> Callable:
    """The generator's train-easy/medium/hard entropy sub-ranges (``generate._make_entropy_fn``)."""
    def restrict(range_):
        width = range_[1] - range_[0]
        return (range_[0] + width * level / levels, range_[0] + width * (level + 1) / levels)

    return restrict


def _integer_pairs(task: str, count: int, rng: np.random.Generator, longer: bool) -> Pairs:
    first_max, second_max = INTEGER_TASKS[task]
    low = first_max + 1 if longer else 0
    high = 10 * first_max + 10 if longer else first_max + 1
    firsts = rng.integers(low, high, count)
    seconds = rng.integers(0, second_max + 1, count)
    minus = rng.integers(0, 2, count).astype(bool)
    return [
        (f"What is {a} {'-' if m else '+'} {b}?", str(a - b if m else a + b))
        for a, b, m in zip(firsts.tolist(), seconds.tolist(), minus.tolist())
    ]


def generate(task: str, sizes: Dict[str, int], seed: int) -> ArithmeticData:
    """Generate the three splits; the same seed gives the same data."""
    if task in INTEGER_TASKS:
        return _generate_integer(task, sizes, seed)
    _, _, settings = _import_generator()
    modules = _modules(task)
    random.seed(seed)
    np.random.seed(seed)
    train: Pairs = []
    levels = modules["train"]
    for index, module in enumerate(levels):
        share = sizes["train"] // len(levels) + (1 if index < sizes["train"] % len(levels) else 0)
        train += _sample(module, share, settings)
    random.Random(seed).shuffle(train)
    seen = {question for question, _ in train}
    splits = {"train": train}
    for name in ("interpolate", "extrapolate"):
        pairs: Pairs = []
        for _ in range(100):
            if len(pairs) == sizes[name]:
                break
            pairs += [p for p in _sample(modules[name], sizes[name] - len(pairs), settings) if p[0] not in seen]
        else:
            raise ValueError(f"{task}: too few {name} questions that are not in the training set")
        splits[name] = pairs
    return ArithmeticData(**splits)


def _generate_integer(task: str, sizes: Dict[str, int], seed: int) -> ArithmeticData:
    rng = np.random.default_rng(seed)
    train = _integer_pairs(task, sizes["train"], rng, longer=False)
    seen = {question for question, _ in train}
    splits = {"train": train}
    for name in ("interpolate", "extrapolate"):
        pairs: Pairs = []
        for _ in range(100):
            if len(pairs) >= sizes[name]:
                break
            fresh = _integer_pairs(task, sizes[name], rng, longer=name == "extrapolate")
            pairs += [p for p in fresh if p[0] not in seen]
        else:
            raise ValueError(f"{task}: too few {name} questions that are not in the training set")
        splits[name] = pairs[: sizes[name]]
    return ArithmeticData(**splits)


# ------------------------------------------------------------------------------ files
def read_pairs(path: str, limit: Optional[int] = None) -> Pairs:
    """Question/answer pairs from a released text file (question line, answer line, ...)."""
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    if len(lines) % 2:
        raise ValueError(f"{path}: expected question/answer line pairs, got an odd number of lines")
    pairs = [(lines[i].strip(), lines[i + 1].strip()) for i in range(0, len(lines), 2)]
    return pairs if limit is None else pairs[:limit]


def write_pairs(path: str, pairs: Pairs) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        for question, answer in pairs:
            handle.write(f"{question}\n{answer}\n")
    os.replace(path + ".tmp", path)


def load_released(data_dir: str, task: str, sizes: Dict[str, int], seed: int) -> ArithmeticData:
    """The released files under ``data_dir`` (e.g. ``mathematics_dataset-v1.0/``).

    The training pairs of all present ``train-*`` levels are shuffled with ``seed`` and cut to
    ``sizes["train"]``; the test splits are cut to their sizes in file order.
    """
    name = "add_or_sub" if task == "add_or_sub_small" else task
    train_files, interpolate_file, extrapolate_file = RELEASED_FILES[name]
    present = [os.path.join(data_dir, f) for f in train_files if os.path.exists(os.path.join(data_dir, f))]
    if not present:
        raise FileNotFoundError(f"no training file of {train_files} under {data_dir}")
    train: Pairs = []
    for path in present:
        train += read_pairs(path)
    random.Random(seed).shuffle(train)
    return ArithmeticData(
        train=train[: sizes["train"]],
        interpolate=read_pairs(os.path.join(data_dir, interpolate_file), sizes["interpolate"]),
        extrapolate=read_pairs(os.path.join(data_dir, extrapolate_file), sizes["extrapolate"]),
    )


def load_or_generate(
    task: str, sizes: Dict[str, int], seed: int, cache_dir: str, data_dir: Optional[str] = None
) -> ArithmeticData:
    """Released files when ``data_dir`` is given, else generated data cached under ``cache_dir``
    (keyed by task, sizes and seed, so a rerun and every variant read the same files)."""
    if data_dir:
        return load_released(data_dir, task, sizes, seed)
    key = json.dumps({"task": task, "sizes": sizes, "seed": seed}, sort_keys=True)
    folder = os.path.join(cache_dir, f"{task}-seed{seed}-{hashlib.sha1(key.encode()).hexdigest()[:8]}")
    paths = {name: os.path.join(folder, f"{name}.txt") for name in SPLITS}
    if all(os.path.exists(p) for p in paths.values()):
        return ArithmeticData(**{name: read_pairs(paths[name]) for name in SPLITS})
    data = generate(task, sizes, seed)
    for name in SPLITS:
        write_pairs(paths[name], data.split(name))
    with open(os.path.join(folder, "config.json"), "w") as handle:
        handle.write(key + "\n")
    return data
