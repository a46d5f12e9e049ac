"""The run's configuration: every command-line option of `train` and `extract`, and the
views a run caches. Its own module so that the jobs built on it (runner, headjob) import it
without importing each other."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from breakhis_tl.heads.training import TrainConfig
from breakhis_tl.models.backbones import DEFAULT_ARCHS


@dataclass
class RunConfig:
    data: str | None = None  # folder holding BreaKHis_v1; None: <out>/data, downloaded if absent
    dataset: str = "breakhis"  # breakhis or idc
    archs: list[str] = field(default_factory=lambda: list(DEFAULT_ARCHS))
    weights: str = "default"  # default, none or a file; per arch: "default,resnet50=none"
    task: str | None = None  # binary or subtype; None: binary (subtype for eva)
    magnification: str = "all"  # all or a list such as 40X,200X
    protocol: str | None = None  # patient, cv, folds, eva or random; None: split file's or patient
    group_by: str | None = None  # patient key: slide (default) or accession
    fold: str | None = None  # fold to run or all; None: all cv folds, official fold 1
    cv: int | None = None  # k folds with patient (grouped) or random (image-level)
    split_file: str | None = None  # reuse a split written by `split --out`
    folds_csv: str | None = None  # official Folds.csv; default: looked for beside BreaKHis_v1
    eva_holdout: bool = False  # eva: its 14 val slides become an untouched test set
    val_frac: float = 0.15
    test_frac: float = 0.15
    recipe: str = "default"  # default, or eva (the eva benchmark's head recipe)
    repeats: int | None = None  # heads per fold, other seeds (features once); None: 1, eva 5
    views: int = 1  # cached dihedral views of each training image (1-8)
    stain: str = "none"  # stain normalisation of every image: none, macenko or reinhard
    stain_ref: str | None = None  # reference image of the normalisation (None: library's)
    stain_views: int = 0  # HED-jittered copies of each training image, cached like views
    input_size: int | None = None  # px fed to CNN backbones; None: each backbone's own (224)
    no_cache: bool = False  # end to end: backbone pass every epoch (logreg: one, not kept)
    strict: bool = False  # stop at the first unreadable image instead of skipping it
    device: str = "auto"
    precision: str = "auto"  # compute mode: auto (measured per backbone), fp32 or bf16
    run: str | None = None  # run name; default: a timestamp
    overwrite: bool = False  # replace an existing run of that name, whole
    out: str = "."  # where summary_writers/, validation_graphs/, trained_models/ go
    cache_dir: str | None = None  # default: <out>/data/cache (features/, images.sqlite)
    workers: int | None = None  # DataLoader workers; default: cores - 1, at most 4
    extract_batch: int = 32
    progress: bool = True
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if isinstance(self.archs, str):  # "a,b" or "all", as on the command line
            from breakhis_tl.models.backbones import parse_archs

            self.archs = parse_archs(self.archs)

    def to_dict(self) -> dict:
        return asdict(self)


def view_pairs(cfg: RunConfig) -> list[tuple[int, int]]:
    """(dihedral view, stain view) of every cached training copy but the image itself."""
    pairs = [(v, sv) for v in range(cfg.views) for sv in range(cfg.stain_views + 1)]
    return pairs[1:]
