"""The published study's numbers (``published_study.json``), typed: what ``bloodcell
report`` compares a reproduction with. Data, not code: correcting a number means
editing the JSON file, and every figure, table and sentence of the report follows."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "published_study.json"


@dataclass(frozen=True)
class GenerationResult:
    model: str                   # the registry name of our model for this generation
    generation: int
    network: str                 # what the study trained
    val_accuracy: float
    test_accuracy: float | None  # None: the study gives none (generation 5)

    @property
    def reference(self) -> tuple[str, float]:
        """(split, accuracy) to compare with: test, or val where the study gives no test."""
        if self.test_accuracy is not None:
            return "test", self.test_accuracy
        return "val", self.val_accuracy


@dataclass(frozen=True)
class ClassF1:
    cls: str
    f1: float
    support: int                 # test images of the class


@dataclass(frozen=True)
class Confusion:
    true: str
    predicted: str
    count: int                   # test images of the best generation


@dataclass(frozen=True)
class Backbone:
    name: str
    parameters_millions: float
    features: int                # the pooled features its classifier reads


@dataclass(frozen=True)
class PublishedStudy:
    source: str
    n_images: int
    test_images: int
    image_size: int
    backbone: Backbone
    generations: tuple[GenerationResult, ...]
    class_f1: tuple[ClassF1, ...]   # the last generation's, on the test set
    confusions: tuple[Confusion, ...]

    @property
    def backbone_generations(self) -> str:
        """The generations that trained the backbone, e.g. "5–6"."""
        g = [r.generation for r in self.generations if r.network.startswith(self.backbone.name)]
        return f"{g[0]}–{g[-1]}" if len(g) > 1 else str(g[0])

    @property
    def val_only(self) -> str:
        """The generations with a validation accuracy only, e.g. "5"."""
        # one generation may have two stand-ins (generation 5: Lite0 or Lite2 frozen)
        gens = sorted({r.generation for r in self.generations if r.test_accuracy is None})
        return ", ".join(str(g) for g in gens)

    def generation(self, model: str) -> GenerationResult | None:
        return next((g for g in self.generations if g.model == model), None)

    @property
    def macro_f1(self) -> float:
        return sum(c.f1 for c in self.class_f1) / len(self.class_f1)

    def f1(self, cls: str) -> float | None:
        return next((c.f1 for c in self.class_f1 if c.cls == cls), None)


def parse(raw: dict) -> PublishedStudy:
    """A ``PublishedStudy`` from the JSON's object; a missing or unknown key raises a
    TypeError naming it (through the dataclasses' constructors)."""
    return PublishedStudy(
        **{**raw, "backbone": Backbone(**raw["backbone"]),
           "generations": tuple(GenerationResult(**g) for g in raw["generations"]),
           "class_f1": tuple(ClassF1(**c) for c in raw["class_f1"]),
           "confusions": tuple(Confusion(**c) for c in raw["confusions"])})


@cache
def study() -> PublishedStudy:
    try:
        return parse(json.loads(SOURCE.read_text()))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{SOURCE}: not a valid description of the published study ({e})") from None
