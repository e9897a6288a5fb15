"""Run configuration: YAML files validated into typed objects, with dotted command-line overrides.

A config file may start from another with ``base: other.yaml``; the file's own keys are merged
over the base recursively (``method.options`` too, unless the file names another method: then the
method section starts afresh). Overrides look like ``solver.lr=0.01``; values are parsed as YAML
(``solver.milestones=[30,60]``, ``teacher=null``); a mapping given for ``method.options`` merges
into the recipe's options like the dotted form ``method.options.weight=2`` does.

Paths, one rule: a path to another config file (``base``, ``teacher.config``) written in a config
file is relative to that file; every other path (data, weights, checkpoints, ``output_dir``), and
every path given on the command line, is relative to the working directory.

``load_config`` takes a file or the name of a recipe shipped with the package (``reviewkd recipes``).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


DEFAULT_VAL_SPLIT = 0.1  # a user's own images: select on a tenth of the training set, never on the test set


class DataConfig(_Section):
    # coco: a COCO-format folder (task: detection); shapes: the rendered-shapes set, generated in root if missing
    # regression: image files with numeric targets (task: regression; see the regression section)
    # ucf101 / video_folder / av_fashion_mnist: clips (task: video; see the video section)
    name: Literal["fashion_mnist", "cifar10", "cifar100", "imagefolder", "coco", "shapes", "regression",
                  "ucf101", "video_folder", "av_fashion_mnist"] = "fashion_mnist"
    root: Optional[str] = None  # None: the dataset's default location
    batch_size: int = Field(128, gt=0)  # global batch (split across processes under torchrun)
    eval_batch_size: int = Field(512, gt=0)
    subset: Optional[int] = Field(None, gt=0)  # N train + N test samples (seeded, balanced over classes)
    # hold this fraction of the training set out for model selection (best.pt) and evaluate the test
    # set once at the end; 0: select on the test set, the convention of the papers' recipes.
    # None (default): 0.1 for a user's own images (imagefolder), 0 for the benchmark datasets whose
    # papers select on the test set (fashion_mnist, cifar10, cifar100); see `selection_split`
    val_split: Optional[float] = Field(None, ge=0, lt=1)
    augment: bool = True
    workers: int = Field(4, ge=0)  # imagefolder only
    image_size: int = Field(224, gt=0)  # imagefolder and regression
    # the scarce-label setting: keep this fraction of the training set, from each class alike, drawn from
    # labelled_seed alone (not the run's seed: every run of a setting sees the same labelled images)
    labelled_fraction: Optional[float] = Field(None, gt=0, le=1)
    labelled_seed: int = Field(0, ge=0)
    # a file of generated images (a cGAN-KD store, .npz) appended to the training set
    generated: Optional[str] = None
    # input normalisation (0..1 scale) in place of the dataset's, for every split (e.g. recomputed on real +
    # generated images); one value, or one per channel
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None

    @model_validator(mode="after")
    def _mean_with_std(self) -> "DataConfig":
        if (self.mean is None) != (self.std is None):
            raise ValueError("data.mean and data.std go together: give both or neither")
        if self.std is not None and (len(self.std) != len(self.mean) or not self.std or min(self.std) <= 0):
            raise ValueError("data.mean and data.std need the same number of values, every std positive")
        return self

    @property
    def normalisation(self) -> Optional[tuple[tuple[float, ...], tuple[float, ...]]]:
        return None if self.mean is None else (tuple(self.mean), tuple(self.std))

    @property
    def selection_split(self) -> Optional[float]:
        """The fraction held out to select best.pt on, None: select on the test set."""
        if self.val_split is None:
            return DEFAULT_VAL_SPLIT if self.name == "imagefolder" else None
        return self.val_split or None


class TapConfig(_Section):
    module: str
    port: Literal["output", "input"] = "output"  # input: the first input of the module's last call


class FeaturesConfig(_Section):
    """A model's stages by module name (see reviewkd.models.stages): ``post`` shallow to deep,
    ``pooled``; optionally ``pre`` (default: post) and ``bn`` (a BatchNorm name or null per stage)."""

    post: list[str | TapConfig] = Field(min_length=1)
    pooled: str | TapConfig
    pre: Optional[list[str | TapConfig]] = None
    bn: Optional[list[Optional[str]]] = None

    @model_validator(mode="after")
    def _one_per_stage(self) -> "FeaturesConfig":
        for key in ("pre", "bn"):
            value = getattr(self, key)
            if value is not None and len(value) != len(self.post):
                raise ValueError(f"features.{key} has {len(value)} entries, post {len(self.post)}: give one per stage")
        return self


class ModelConfig(_Section):
    name: str = "resnet8"  # a zoo model, torchvision/<builder>, timm/<name> or package.module:function
    weights: Optional[str] = None  # initial weights (torch / torchvision / safetensors file)
    features: Optional[FeaturesConfig] = None  # its stages, when they are not found automatically


class TeacherConfig(_Section):
    name: str
    checkpoint: Optional[str] = None  # a run checkpoint (best.pt / last.pt) or a bare weight file
    config: Optional[str] = None  # the teacher's own config: trained first when the checkpoint is missing
    features: Optional[FeaturesConfig] = None  # its stages, when they are not found automatically
    # overrides for the teacher's config when it is trained first (the student's own overrides reach
    # it only for where and how to run: output_dir, data.root, data.workers, runtime.*)
    overrides: list[str] = Field(default_factory=list)


class MethodConfig(_Section):
    name: str = "vanilla"
    ce_weight: Optional[float] = None  # None: the method's recipe default
    options: dict[str, Any] = Field(default_factory=dict)
    student_stages: Optional[list[int]] = None
    teacher_stages: Optional[list[int]] = None


class SolverConfig(_Section):
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    epochs: int = Field(240, gt=0)
    schedule: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: list[int] = Field(default_factory=lambda: [150, 180, 210])
    gamma: float = Field(0.1, gt=0)
    warmup_epochs: float = Field(0.0, ge=0)  # linear learning-rate warm-up
    pretrain_lr: Optional[float] = None  # methods with a pre-training stage; None: the method's, else lr
    clip_grad_norm: Optional[float] = Field(None, gt=0)  # clip each group's gradient L2 norm (None: no clipping)


class RuntimeConfig(_Section):
    device: str = "auto"  # auto, cpu, cuda, cuda:1
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 where supported
    channels_last: bool = True
    # torch.compile the training step and the evaluated model; where compiling fails, eager, with a warning
    compile: bool = False
    fold_teacher_bn: bool = True  # run the frozen teacher with BatchNorm folded into its convolutions
    # CPU runs on glibc: keep freed memory for the next step's tensors (no page faults per large tensor)
    reuse_freed_memory: bool = True
    deterministic: bool = False
    sync_bn: bool = False
    eval_every: int = Field(1, gt=0)
    # without a progress bar (output not a terminal: batch jobs, CI): a progress line this often, 0: never
    log_every_seconds: float = Field(30.0, ge=0)
    # also write last.pt every N training iterations (None: at the end of each epoch / checkpoint period)
    checkpoint_every: Optional[int] = Field(None, gt=0)


class DetectionConfig(_Section):
    """Object detection / instance segmentation (``task: detection``), iteration-based.

    Paths are relative to ``data.root``. ``model.name`` / ``teacher.name`` are detector names such
    as ``fasterrcnn_resnet18_fpn``; ``solver`` gives the optimizer, lr, momentum, weight decay and
    gamma (its epoch fields are not used: the schedule is ``max_iter`` / ``steps`` here).
    """

    train_images: str = "train2017"
    train_annotations: str = "annotations/instances_train2017.json"
    val_images: str = "val2017"
    val_annotations: str = "annotations/instances_val2017.json"
    labels: Literal["contiguous", "category_id"] = "contiguous"  # category_id: torchvision's 91 COCO classes
    shapes: dict[str, Any] = Field(default_factory=dict)  # generator options when data.name is shapes
    min_size_train: list[int] = Field(default_factory=lambda: [640, 672, 704, 736, 768, 800])
    max_size_train: int = Field(1333, gt=0)
    min_size_test: int = Field(800, gt=0)
    max_size_test: int = Field(1333, gt=0)
    flip_prob: float = Field(0.5, ge=0, le=1)
    backbone_weights: Optional[str] = None  # ImageNet weights of the student backbone (torchvision file)
    trainable_layers: Optional[int] = Field(None, ge=0, le=5)  # None: 3 with backbone weights, else 5
    frozen_bn: Optional[bool] = None  # None: frozen with backbone weights
    detector_options: dict[str, Any] = Field(default_factory=dict)  # torchvision detector keyword arguments
    max_iter: int = Field(90000, gt=0)
    steps: list[int] = Field(default_factory=lambda: [60000, 80000])  # LR x gamma at these iterations
    warmup_iters: int = Field(1000, ge=0)  # linear LR warm-up
    checkpoint_period: int = Field(5000, gt=0)  # last.pt every N iterations (and at the end)
    eval_period: int = Field(0, ge=0)  # COCO eval every N iterations; 0: only at the end
    log_period: int = Field(20, gt=0)  # a metrics.csv row every N iterations


class RegressionConfig(_Section):
    """Image regression (``task: regression``): ``data.root`` is a folder of images whose names
    start with the target (UTKFace: ``age_gender_race_date.jpg``), or holds ``train/`` and
    ``test/`` such folders; or ``csv`` names a CSV (a file, or a folder with train.csv / test.csv)
    of image paths and targets. A single source is split by ``test_fraction``."""

    csv: Optional[str] = None
    file_column: str = "file"
    target_column: str = "target"
    channels: Literal[1, 3] = 3
    test_fraction: float = Field(0.2, gt=0, lt=1)
    normalise: Literal["standard", "minmax", "max", "none"] = "standard"  # targets, from the training set's values
    loss: Literal["mse", "l1"] = "mse"
    synthetic: Optional[dict[str, Any]] = None  # generate disc-radius images in data.root when it is missing


class CgankdConfig(_Section):
    """A cGAN-KD pipeline (``reviewkd train`` runs its stages; see ``reviewkd.cgankd.pipeline``).

    The run's own ``model`` / ``method`` / ``solver`` are the student stage's; ``teacher`` is the
    filter / relabelling teacher. ``nokd``, ``gan``, ``dre_extractor`` and ``dre`` are partial
    configs of those training stages, merged over the run's task, data, seed and runtime. ``None``
    defaults follow ``version`` (final: fine-tune from the NOKD student, per-class cut-off; v1: from
    scratch, global cut-off; regression: global cut-off always)."""

    version: Literal["final", "v1"] = "final"
    rho: float = Field(0.9, gt=0, le=1)  # filter: keep fakes whose teacher loss is below the rho-quantile
    filter_scope: Optional[Literal["per_class", "global"]] = None
    filter_burn_in: int = Field(1000, gt=0)  # fakes per class (per_class) or in all (global) for the cut-off
    adjust: bool = True  # relabel the kept fakes with the teacher's prediction
    filter_on_augmented: Optional[bool] = None  # the teacher scores randomly cropped + flipped fakes (None: final)
    student_init: Optional[Literal["nokd", "scratch"]] = None
    pool_per_class: int = Field(5000, gt=0)  # processed fakes per class (regression: per conditioning label)
    # regression: conditioning labels, that many evenly spaced over [0, 1], or "distinct": the distinct
    # training targets (the released UTKFace run's default, samp_num_fake_labels = -1)
    regression_labels: int | Literal["distinct"] = 100
    num_fake: int = Field(100000, ge=0)  # M^g, the fakes the student sees
    sampler_burn_in: int = Field(5000, gt=0)  # rejection sampling: draws per label that set M
    sample_batch: int = Field(600, gt=0)
    recompute_normalisation: Optional[bool] = None  # None: yes for classification, no for regression
    integer_labels: bool = False  # regression: relabelled targets truncated to integers (the released UTKFace ages)
    grid_per_class: int = Field(8, gt=0)  # images per row of the PNG grids
    nokd: dict[str, Any] = Field(default_factory=dict)
    gan: dict[str, Any] = Field(default_factory=dict)
    dre_extractor: dict[str, Any] = Field(default_factory=dict)
    dre: dict[str, Any] = Field(default_factory=dict)
    quick: list[str] = Field(default_factory=list)  # overrides applied by `reviewkd train --quick`

    @field_validator("regression_labels")
    @classmethod
    def _at_least_two(cls, v):
        if isinstance(v, int) and v < 2:
            raise ValueError('must be at least 2 evenly spaced labels, or "distinct"')
        return v


class CganConfig(_Section):
    """A conditional GAN (``task: cgan``; see ``reviewkd.cgankd.gan``): class-conditional on
    classification data, continuous labels (CcGAN) on ``data.name: regression``. One iteration is
    one discriminator step on one real batch; the generator steps after every ``d_steps`` of them."""

    arch: Literal["biggan32", "small"] = "small"
    width: Optional[int] = Field(None, gt=0)  # channel unit (None: the arch's: 64 biggan32, 16 small)
    z_dim: Optional[int] = Field(None, gt=0)  # None: the arch's (128 biggan32, 64 small)
    d_steps: int = Field(4, gt=0)
    lr_g: float = Field(2e-4, gt=0)
    lr_d: float = Field(2e-4, gt=0)
    betas: tuple[float, float] = (0.0, 0.999)
    diffaug: str = "color,translation,cutout"  # "" switches DiffAugment off
    ema_decay: float = Field(0.9999, ge=0, lt=1)
    ema_start: int = Field(1000, ge=0)  # generator steps before the EMA starts averaging (a copy until then)
    kappa_arg: float = Field(2.0, gt=0)  # CcGAN: kappa = kappa_arg x the largest gap between distinct labels
    weight_threshold: float = Field(1e-3, gt=0, lt=1)  # CcGAN: real / fake labels kept where the weight exceeds it
    eval_samples: int = Field(500, gt=0)  # generated images scored at each evaluation
    # real images as D sees them: as stored, flipped (the released CcGAN), or cropped from a 4-pixel zero
    # padding and flipped (BigGAN's --augment on CIFAR); keep "none" where a flip changes the label (angles)
    real_augment: Literal["none", "flip", "crop_flip"] = "none"


class DreConfig(_Section):
    """The conditional density-ratio model (``task: dre``; see ``reviewkd.cgankd.dre``) on a frozen
    generator and a frozen feature extractor (both required)."""

    generator: Optional[str] = None  # best.pt of a task: cgan run
    extractor: Optional[str] = None  # best.pt of a classification run of dre_extractor_small / _resnet34,
    # or of a task: dre_autoencoder run (regression)
    penalty: float = Field(0.01, ge=0)  # lambda of (E_fake[r] - 1)^2 (v1: 1e-3)
    widths: list[int] = Field(default_factory=lambda: [2048, 1024, 512, 256, 128])
    betas: tuple[float, float] = (0.5, 0.999)
    flip: bool = True  # flip real images (not for labels a flip changes, e.g. angles)
    eval_samples: int = Field(1000, gt=0)
    # task: dre_autoencoder (the regression feature extractor): its channel unit and loss weights
    autoencoder_width: int = Field(32, gt=0)
    sparsity: float = Field(1e-3, ge=0)
    regression_weight: float = Field(1.0, ge=0)


KINETICS_MEAN, KINETICS_STD = (0.43216, 0.394666, 0.37645), (0.22803, 0.22145, 0.216989)


class EmbeddedAVConfig(_Section):
    """The embedded audio-visual set (``data.name: av_fashion_mnist``, generated on first use; see
    ``reviewkd.data.av_fashion_mnist``): clip counts, the generator's seed, spoken utterances per
    class, and how many frames a stored clip has beyond ``video.frames`` (room for the temporal
    crop and for evenly spaced evaluation clips that differ)."""

    train: int = Field(6000, gt=0, le=60000)
    test: int = Field(2000, gt=0, le=10000)
    seed: int = Field(0, ge=0)
    utterances: int = Field(24, gt=0)  # per class and split (train and test voices are drawn apart)
    extra_frames: int = Field(4, ge=0)


class VideoConfig(_Section):
    """Video classification (``task: video``): clips of ``frames`` frames at ``size`` x ``size``.

    ``modality`` is what the trained network consumes: ``video`` clips (N x 3 x T x H x W; the
    student), ``audio`` the clip's audio (the audio teacher; trained on the class it hears where the
    data know it), ``frame`` one frame of the clip (an image teacher; a random frame per batch in
    training, the middle frame in evaluation). Training: a random temporal crop of ``frames``
    consecutive frames, a random-resized crop (area ``crop_scale``, aspect ``crop_ratio``) and a
    horizontal flip; evaluation: ``eval_clips`` evenly spaced clips, centre crop, softmax averaged
    per video. Frames read from files are first resized to ``load_size`` (H, W)."""

    frames: int = Field(16, gt=0)
    size: int = Field(112, gt=0)
    modality: Literal["video", "audio", "frame"] = "video"
    eval_clips: int = Field(3, gt=0)
    audio_features: Optional[str] = None  # ucf101 / video_folder: a folder of <video name>.npy vectors
    audio_dim: int = Field(512, gt=0)  # length of those vectors
    mismatch: float = Field(0.0, ge=0, le=1)  # av_fashion_mnist: rate of clips carrying another class's audio
    crop_scale: tuple[float, float] = (0.25, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    load_size: tuple[int, int] = (128, 171)
    mean: list[float] = Field(default_factory=lambda: list(KINETICS_MEAN))
    std: list[float] = Field(default_factory=lambda: list(KINETICS_STD))
    splits: Optional[str] = None  # ucf101: the folder of trainlist01.txt / testlist01.txt (default root/ucfTrainTestlist)
    split: int = Field(1, ge=1, le=3)  # ucf101: which of the three splits
    embedded: EmbeddedAVConfig = Field(default_factory=EmbeddedAVConfig)

    @model_validator(mode="after")
    def _ranges(self) -> "VideoConfig":
        (s0, s1), (r0, r1) = self.crop_scale, self.crop_ratio
        if not (0 < s0 <= s1 <= 1) or not (0 < r0 <= r1):
            raise ValueError(f"video.crop_scale needs 0 < low <= high <= 1 and video.crop_ratio 0 < low <= high "
                             f"(got {list(self.crop_scale)}, {list(self.crop_ratio)})")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("video.mean and video.std need three values each (RGB), every std positive")
        return self


class Config(_Section):
    task: Literal["classification", "detection", "regression", "cgan", "dre", "dre_autoencoder", "video"] = "classification"
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    teacher: Optional[TeacherConfig] = None
    method: MethodConfig = Field(default_factory=MethodConfig)
    solver: SolverConfig = Field(default_factory=SolverConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    detection: Optional[DetectionConfig] = None  # task: detection only (defaults when omitted)
    regression: Optional[RegressionConfig] = None  # task: regression only (defaults when omitted)
    video: Optional[VideoConfig] = None  # task: video only (defaults when omitted)
    cgankd: Optional[CgankdConfig] = None  # a cGAN-KD pipeline: the stages before this student run
    cgan: Optional[CganConfig] = None  # task: cgan only (defaults when omitted)
    dre: Optional[DreConfig] = None  # task: dre only
    # the command-line overrides this config was loaded with (the teacher plan says which reach the teacher)
    _overrides: tuple[str, ...] = PrivateAttr(default=())

    def __eq__(self, other) -> bool:  # the same settings, however they were given
        return isinstance(other, Config) and self.model_dump() == other.model_dump()

    __hash__ = None

    @model_validator(mode="after")
    def _task_sections(self) -> "Config":
        detection_data = self.data.name in ("coco", "shapes")
        video_data = self.data.name in ("ucf101", "video_folder", "av_fashion_mnist")
        if self.task != "video" and (self.video is not None or video_data):
            raise ValueError("a 'video' section or data.name ucf101/video_folder/av_fashion_mnist needs task: video")
        if self.task == "video":
            if not video_data:
                raise ValueError(f"task: video reads clips: data.name must be ucf101, video_folder or av_fashion_mnist, "
                                 f"got {self.data.name}")
            if self.video is None:
                self.video = VideoConfig()
            if self.video.modality != "frame" and "channels_last" not in self.runtime.model_fields_set:
                self.runtime.channels_last = False  # 5-D clips and 1-D vectors have no channels-last layout
        if self.task != "detection" and (self.detection is not None or detection_data):
            raise ValueError("a 'detection' section or data.name coco/shapes needs task: detection")
        continuous_ok = ("regression", "cgan", "dre", "dre_autoencoder")  # CcGAN and its DRE read regression data
        if self.task not in continuous_ok and (self.regression is not None or self.data.name == "regression"):
            raise ValueError("a 'regression' section or data.name regression needs task: regression")
        if self.task in continuous_ok and self.data.name == "regression" and self.regression is None:
            self.regression = RegressionConfig()
        if self.task != "cgan" and self.cgan is not None:
            raise ValueError("a 'cgan' section needs task: cgan")
        if self.task not in ("dre", "dre_autoencoder") and self.dre is not None:
            raise ValueError("a 'dre' section needs task: dre or dre_autoencoder")
        if self.task == "cgan" and self.cgan is None:
            self.cgan = CganConfig()
        if self.task == "regression":
            if self.data.name != "regression":
                raise ValueError(f"task: regression reads data.name: regression, got {self.data.name}")
            if self.regression is None:
                self.regression = RegressionConfig()
        if self.task == "detection":
            if not detection_data:
                raise ValueError(f"task: detection reads COCO-format data: data.name must be coco or shapes, "
                                 f"got {self.data.name}")
            if self.detection is None:
                self.detection = DetectionConfig()
        return self

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError("must be a plain folder name (no '/', not starting with '.')")
        return v

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def read_config_file(path: Path) -> dict:
    """A config file as a dict, its ``base`` chain merged in (not validated)."""
    return _read_yaml(Path(path))


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys, got {type(data).__name__}")
    _relative_to_file(data, path)
    base = data.pop("base", None)
    if base is None:
        return data
    return _merge(_read_yaml((path.parent / base), seen + (path.resolve(),)), data)


def _relative_to_file(data: dict, path: Path) -> None:
    """``teacher.config`` written in a file names a file relative to it (``base`` is read so too), as
    does a second teacher's (``method.options.image_teacher.config``, CCL's image teacher)."""
    method = data.get("method")
    options = method.get("options") if isinstance(method, dict) else None
    second = options.get("image_teacher") if isinstance(options, dict) else None
    for teacher in (data.get("teacher"), second):
        if isinstance(teacher, dict) and isinstance(teacher.get("config"), str):
            target = Path(teacher["config"]).expanduser()
            if not target.is_absolute():
                teacher["config"] = str((path.parent / target).resolve())


def _merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key == "method" and isinstance(value, dict) and isinstance(out.get(key), dict) \
                and value.get("name", out[key].get("name")) != out[key].get("name"):
            out[key] = copy.deepcopy(value)  # another method: the base's options are not its options
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_override(data: dict, override: str, source: str = "command line") -> None:
    """Apply one ``dotted.key=value`` override to a raw config dict."""
    if "=" not in override:
        raise ConfigError(f"{source}: override {override!r} must look like key.sub=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: cannot set {key}: {'.'.join(parts[:i + 1])} is not a section")
        node = child
    if parts[-2:] == ["method", "options"] and isinstance(value, dict) and isinstance(node.get("options"), dict):
        value = {**node["options"], **value}  # merges like method.options.KEY=VALUE does
    node[parts[-1]] = value


def _describe(error: dict) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    if not loc:  # a check across sections
        return str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"unknown key {loc!r}"
    got = error.get("input")
    got_text = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{loc}: {error['msg']}{got_text}"


def validate(data: dict, source: str) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = _describe(errors[0])
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ConfigError(f"{source}: {first}{more}") from None


def config_path(path: str | Path) -> Path:
    """An existing config file, else the shipped recipe of that name; a one-line error otherwise."""
    from .catalogue import find_recipe

    if Path(path).is_file():
        return Path(path)
    if Path(path).is_dir():
        raise ConfigError(f"{path} is a folder: give a config file (.yaml) or a recipe name (`reviewkd recipes`)")
    try:
        return find_recipe(str(path))
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A validated config from a file or a recipe name, with dotted ``overrides`` applied."""
    path = config_path(path) if path is not None else None
    data = _read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "config"
    for item in overrides:
        apply_override(data, item)
    if path is not None and "name" not in data:
        data["name"] = path.stem
    config = validate(data, source)
    config._overrides = tuple(overrides)
    return config


def save_config(config: Config, path: Path) -> None:
    path.write_text(config.to_yaml())
