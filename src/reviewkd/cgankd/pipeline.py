"""The cGAN-KD pipeline in one command: ``reviewkd train`` on a config with a ``cgankd:`` section.

Stages, each in its own folder under the run folder ``<output_dir>/<name>/``:

1. ``nokd/``: the student trained on the real data alone (CE), the starting point of the final
   version's student (``student_init: nokd``) and its baseline;
2. the filter teacher: the run's ``teacher`` section, through the engine's teacher plan (its
   checkpoint, or its config trained first where the checkpoint is missing);
3. ``gan/``: the conditional GAN (``cgankd.gan``: a ``task: cgan`` config);
4. ``dre_extractor/``: the density-ratio feature extractor (``cgankd.dre_extractor``);
5. ``dre/``: the conditional density-ratio model on the frozen extractor and generator;
6. ``sample/pool.npz``: density-ratio rejection sampling, per class (per conditioning label for
   regression);
7. ``filter/kept.npz``: the fakes the teacher finds plausible for their label (rho-quantile cut-off);
8. ``relabel/fakes.npz``: their labels replaced by the teacher's (``adjust``: taken from the filter's
   own teacher pass), in the data's unit;
9. ``mixed/generated.npz``: M^g of them, balanced over those labels (uniform for regression), and the input
   normalisation recomputed on real + fake (``mixed/normalisation.json``);
10. ``student/``: the student on real + fake with the run's ``method`` (CE, or any registered
    method: "cGAN-KD + X"), fine-tuned from ``nokd/best.pt`` or from scratch.

A stage whose output exists is skipped; a training stage that was interrupted continues from its
``last.pt`` (the engine's resume); the other stages write their output atomically at their end and
are redone when killed. Everything cheap is checked before the first stage (every stage config
validated, the teacher plan, a writable run folder). ``summary.md`` / ``summary.json`` hold each
stage's time and counts, ``samples_*.png`` generated images beside accepted and rejected ones.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import Config, ConfigError, MethodConfig, apply_override, validate
from . import mixed
from .store import GeneratedSet, load_generated, save_generated

TRAINING_STAGES = ("nokd", "gan", "dre_extractor", "dre")
# What the pipeline passes from the run to each training stage (the rest comes from cgankd.<stage>).
_COMMON = ("task", "seed", "data", "runtime", "regression")


@dataclass
class StagePlan:
    name: str
    kind: str  # train | teacher | process
    output: Path
    config: Optional[Config] = None
    about: str = ""


class Pipeline:
    """A cGAN-KD run of ``cfg`` (which has a ``cgankd`` section). ``quick`` applies the recipe's
    ``cgankd.quick`` overrides (tiny settings for smoke tests) and runs in ``<name>_quick``; ``say``
    takes the progress lines (default: printed and appended to ``<run_dir>/pipeline.log``)."""

    def __init__(self, cfg: Config, quick: bool = False, progress: bool = True,
                 say: Optional[Callable[[str], None]] = None):
        if cfg.cgankd is None:
            raise ConfigError(f"{cfg.name}: not a cGAN-KD config (no 'cgankd' section)")
        if quick and cfg.cgankd.quick:
            data = cfg.model_dump(mode="json")
            for item in cfg.cgankd.quick:
                apply_override(data, item, "cgankd.quick")
            data["name"] = f"{cfg.name}_quick"  # never mixed up with the full run's stages
            overrides = cfg._overrides
            cfg = validate(data, f"{cfg.name} (--quick)")
            cfg._overrides = overrides
        self.cfg, self.progress = cfg, progress
        self.c = cfg.cgankd
        self.classification = cfg.task == "classification"
        self.run_dir = cfg.run_dir
        self.say = say or self._print_and_log
        self.version = self.c.version
        self.scope = self.c.filter_scope or ("per_class" if self.classification and self.version == "final" else "global")
        self.init = self.c.student_init or ("nokd" if self.version == "final" else "scratch")
        self.recompute = self.c.recompute_normalisation
        if self.recompute is None:
            self.recompute = self.classification
        self._check()
        self.plan = self._plan()

    # ------------------------------------------------------------------ cheap checks
    def _check(self) -> None:
        cfg = self.cfg
        if cfg.task not in ("classification", "regression"):
            raise ConfigError(f"{cfg.name}: cGAN-KD is for classification and regression, not {cfg.task}")
        if cfg.teacher is None:
            raise ConfigError(f"{cfg.name}: cGAN-KD needs the filter teacher: add a 'teacher' section (name + "
                              "checkpoint or config)")
        if self.scope == "per_class" and not self.classification:
            raise ConfigError(f"{cfg.name}: cgankd.filter_scope per_class is for classification; regression "
                              "filters with one global cut-off")
        if cfg.data.generated is not None:
            raise ConfigError(f"{cfg.name}: data.generated is set by the pipeline itself: remove it")
        c = self.c
        if not self.classification and isinstance(c.regression_labels, int):
            kept = math.floor(c.rho * c.regression_labels * c.pool_per_class + 1e-9)  # the global filter keeps ~rho
            if c.num_fake > kept:
                raise ConfigError(f"{cfg.name}: cgankd.num_fake = {c.num_fake} but the filter keeps about {kept} "
                                  f"(rho {c.rho} x {c.regression_labels} labels x pool_per_class {c.pool_per_class}): "
                                  "raise cgankd.pool_per_class or lower cgankd.num_fake")
        for stage in ("gan", "dre"):
            if not getattr(self.c, stage):
                raise ConfigError(f"{cfg.name}: cgankd.{stage} is empty: give the {stage} stage's settings "
                                  "(at least its task)")
        existing = self.run_dir
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"cannot write the run folder {self.run_dir} ({existing} is not a writable folder): "
                              "choose another output_dir")

    def stage_config(self, stage: str, extra: Optional[dict] = None) -> Config:
        """The config of a training stage: the run's common sections, then ``cgankd.<stage>``."""
        from ..config import _merge

        run = self.cfg.model_dump(mode="json")
        base = {k: run[k] for k in _COMMON if run.get(k) is not None}
        base.update(output_dir=str(self.run_dir), name=stage)
        if stage == "nokd":  # the student on real data alone
            base.update(model=run["model"], solver=run["solver"], method={"name": "vanilla"})
        data = _merge(base, getattr(self.c, stage))
        if extra:
            data = _merge(data, extra)
        data.pop("cgankd", None)
        try:
            return validate(data, f"{self.cfg.name}: cgankd.{stage}")
        except ConfigError as exc:
            raise ConfigError(str(exc)) from None

    def _plan(self) -> list[StagePlan]:
        r = self.run_dir
        plan = []
        if self.init == "nokd":
            plan.append(StagePlan("nokd", "train", r / "nokd" / "best.pt", self.stage_config("nokd"),
                                  "the student on real data alone"))
        plan.append(StagePlan("teacher", "teacher", Path(), None, "the filter teacher"))
        plan.append(StagePlan("gan", "train", r / "gan" / "best.pt", self.stage_config("gan"), "conditional GAN"))
        if self.c.dre_extractor:
            plan.append(StagePlan("dre_extractor", "train", r / "dre_extractor" / "best.pt",
                                  self.stage_config("dre_extractor"), "density-ratio feature extractor"))
        plan.append(StagePlan("dre", "train", r / "dre" / "best.pt", self.stage_config("dre", self._dre_inputs()),
                              "conditional density-ratio model"))
        plan += [StagePlan("sample", "process", r / "sample" / "pool.npz", about="rejection sampling"),
                 StagePlan("filter", "process", r / "filter" / "kept.npz", about="teacher filter"),
                 StagePlan("relabel", "process", r / "relabel" / "fakes.npz", about="label adjustment"),
                 StagePlan("mixed", "process", r / "mixed" / "generated.npz", about=f"M^g = {self.c.num_fake} fakes")]
        plan.append(StagePlan("student", "train", r / "student" / "best.pt", None, "the student on real + fake"))
        return plan

    def _dre_inputs(self) -> dict:
        """Where the density-ratio run finds the generator and the extractor (written by earlier stages)."""
        inputs = {"generator": str(self.run_dir / "gan" / "best.pt")}
        if self.c.dre_extractor:
            inputs["extractor"] = str(self.run_dir / "dre_extractor" / "best.pt")
        return {"dre": inputs}

    def student_config(self) -> Config:
        """The student stage's config (needs the mixed stage's output for the normalisation)."""
        data = self.cfg.model_dump(mode="json")
        data.pop("cgankd")
        data.update(output_dir=str(self.run_dir), name="student")
        data["data"]["generated"] = str(self.run_dir / "mixed" / "generated.npz")
        stats_file = self.run_dir / "mixed" / "normalisation.json"
        if self.recompute and stats_file.is_file():
            stats = json.loads(stats_file.read_text())
            data["data"]["mean"], data["data"]["std"] = stats["mean"], stats["std"]
        if self.init == "nokd":
            data["model"]["weights"] = str(self.run_dir / "nokd" / "best.pt")
        cfg = validate(data, f"{self.cfg.name}: student stage")
        cfg._overrides = self.cfg._overrides
        return cfg

    def describe(self) -> str:
        lines = [f"# cGAN-KD pipeline ({self.version} version): filter {self.scope}, rho {self.c.rho}, "
                 f"adjust {'on' if self.c.adjust else 'off'}, student from {self.init}, M^g {self.c.num_fake}, "
                 f"method {self.cfg.method.name}; output {self.run_dir}"]
        for i, s in enumerate(self.plan, 1):
            done = " (done)" if s.kind != "teacher" and self._done(s) else ""
            lines.append(f"{i:2d}. {s.name:14s} {s.about}{done}")
        lines.append(f"    teacher: {self._teacher_plan().describe()}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ running
    def _done(self, stage: StagePlan) -> bool:
        if stage.kind != "train":
            return stage.output.is_file()
        from ..engine.loop import _finished

        return stage.output.is_file() and _finished(stage.output.parent / "last.pt")

    def _teacher_plan(self):
        from ..engine.loop import plan_teacher

        cfg = self.cfg.model_copy(update={"method": MethodConfig(name="kd")})
        cfg._overrides = self.cfg._overrides
        return plan_teacher(cfg)

    def _print_and_log(self, line: str) -> None:
        print(line, flush=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "pipeline.log", "a") as log:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def run(self) -> dict:
        """Every stage in order (skipping finished ones); the summary dict."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        summary = self._read_summary()
        for stage in self.plan:
            if stage.kind != "teacher" and self._done(stage):
                self.say(f"[cgankd] {stage.name}: output exists ({stage.output}), skipped")
                continue
            self.say(f"[cgankd] {stage.name}: {stage.about} ...")
            start = time.perf_counter()
            record = getattr(self, f"_stage_{stage.name}")(stage) if stage.kind != "train" or stage.name == "student" \
                else self._train(stage)
            seconds = time.perf_counter() - start
            entry = summary.setdefault("stages", {}).setdefault(stage.name, {})
            entry.update(record or {})
            entry["seconds"] = round(entry.get("seconds", 0.0) + seconds, 2)
            self._write_summary(summary)
            self.say(f"[cgankd] {stage.name}: done in {seconds:.1f}s{_brief(record)}")
        self._write_summary(summary)
        return summary

    def _train(self, stage: StagePlan, cfg: Optional[Config] = None) -> dict:
        from ..engine.loop import Run

        cfg = cfg or stage.config
        resume = (cfg.run_dir / "last.pt").is_file() or (cfg.run_dir / "config.yaml").is_file()
        result = Run(cfg, resume=resume, progress=self.progress).fit()
        out = {"best_score": result.best_score, "score_key": result.score_key}
        if result.metrics:
            out["metrics"] = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
        return out

    def _stage_teacher(self, stage: StagePlan) -> dict:
        from ..engine.loop import Run

        plan = self._teacher_plan()
        if plan.config is not None:
            self.say(f"[cgankd] teacher: {plan.describe()}")
            Run(plan.config, resume=(plan.config.run_dir / "last.pt").is_file(), progress=self.progress).fit()
        self.teacher_checkpoint = plan.checkpoint
        return {"checkpoint": str(plan.checkpoint)}

    def _teacher(self):
        """The filter teacher as uint8 images -> logits, or predictions on the generator's [0, 1]."""
        from .filtering import teacher_function

        if getattr(self, "teacher_checkpoint", None) is None:
            self.teacher_checkpoint = self._teacher_plan().checkpoint
        labels = self._label_map()
        return teacher_function(self.teacher_checkpoint, label_range=None if labels is None else (labels.low, labels.high))

    def _real_training_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The real training images (uint8, as stored) and labels (classes / original unit)."""
        cfg = self.cfg
        task_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"generated": None})})
        from ..tasks import get_task

        data = get_task(cfg.task).build_data(task_cfg, torch.device("cpu"))
        images, labels = data.train.images, data.train.labels
        if not self.classification:  # the loader holds normalised targets: back to the original unit
            from ..data.regression import TargetScaler

            labels = TargetScaler.from_dict(data.meta["target_scaler"]).denormalise(labels.double())
        return images.cpu(), labels.cpu()

    def _label_map(self) -> Optional["LabelMap"]:
        if self.classification:
            return None
        if not hasattr(self, "_labels"):
            _, targets = self._real_training_set()
            low = 0.0 if self.cfg.regression.normalise == "max" else float(targets.min())  # as tasks/cgan.py
            self._labels = LabelMap(low, float(targets.max()))
        return self._labels

    def _conditioning_labels(self, num_classes: Optional[int]) -> list:
        if num_classes is not None:
            return list(range(num_classes))
        if self.c.regression_labels == "distinct":  # the training targets' distinct values, on [0, 1]
            _, targets = self._real_training_set()
            return self._label_map().to_unit(torch.unique(targets.double())).tolist()
        return torch.linspace(0, 1, self.c.regression_labels, dtype=torch.float64).tolist()

    def _sampler(self):
        from .dre import load_density_ratio
        from .gan import load_generator
        from .sampling import RejectionSampler

        generator = load_generator(self.run_dir / "gan" / "best.pt")
        ratio = load_density_ratio(self.run_dir / "dre" / "best.pt")
        if self.cfg.runtime.channels_last:  # halves the generator's time on a CPU; the draws are unchanged
            generator, ratio = (m.to(memory_format=torch.channels_last) for m in (generator, ratio))
        return RejectionSampler(generator, ratio, burn_in=self.c.sampler_burn_in, batch_size=self.c.sample_batch)

    def _per_label(self) -> tuple[int, int]:
        """(filter burn-in, candidates) drawn per label: per class, a burn-in that only sets the
        cut-off and pool / rho candidates (about rho of them pass); globally, the pool itself."""
        if self.scope == "per_class":
            return self.c.filter_burn_in, math.ceil(self.c.pool_per_class / self.c.rho)
        return 0, self.c.pool_per_class

    def _stage_sample(self, stage: StagePlan) -> dict:
        sampler = self._sampler()
        labels = self._conditioning_labels(sampler.generator.num_classes)
        burn, candidates = self._per_label()
        images, label_list, stats = [], [], []
        for i, label in enumerate(labels):
            got, info = sampler.sample(label, burn + candidates, seed=_seed(self.cfg.seed, i, 0),
                                       report=lambda line: self.say(f"[cgankd] sample: {line}"))
            self.say(f"[cgankd] sample: label {i + 1}/{len(labels)} ({label:.4g}): {len(got)} accepted of "
                     f"{info['drawn']} drawn (rate {info['acceptance_rate']:.4f})")
            images.append(got)
            label_list.append(torch.full((len(got),), label, dtype=torch.int64 if self.classification else torch.float64))
            stats.append({k: float(v) for k, v in info.items()})
        drawn = sum(s["drawn"] for s in stats)
        accepted = sum(s["accepted"] for s in stats)
        record = {"labels": len(labels), "filter_burn_in_per_label": burn, "candidates_per_label": candidates,
                  "drawn": int(drawn), "accepted": int(accepted), "acceptance_rate": accepted / max(drawn, 1),
                  "label_space": "class" if self.classification else "unit_interval"}
        save_generated(stage.output, torch.cat(images), torch.cat(label_list),
                       {"stage": "sample", "seed": self.cfg.seed, **_settings(self.c), **record, "per_label": stats})
        return record

    def _filter(self):
        from .filtering import TeacherFilter

        augment = None
        on_augmented = self.c.filter_on_augmented
        if on_augmented is None:
            on_augmented = self.classification and self.version == "final"
        if on_augmented:
            augment = crop_and_flip(self.cfg.seed)
        return TeacherFilter(self._teacher(), self.c.rho, scope=self.scope, kind="ce" if self.classification else "abs_error",
                             burn_in=self.c.filter_burn_in, augment=augment)

    def _stage_filter(self, stage: StagePlan) -> dict:
        """Per class (final version): the class's burn-in sets its cut-off, its candidates strictly
        below it are kept, at most ``pool_per_class``; a class left short is topped up by sampling and
        filtering more, as the released loop does. Global (v1, regression): one cut-off, the
        rho-quantile over the whole pool, and the pool's fakes strictly below it."""
        pool = load_generated(self.run_dir / "sample" / "pool.npz")
        flt = self._filter()
        burn, _ = self._per_label()
        keep_mask = torch.zeros(len(pool), dtype=torch.bool)
        # the teacher's adjusted label of every pool image, from the pass that scored it
        teacher = torch.zeros(len(pool), dtype=torch.int64 if self.classification else torch.float64)
        extra_images, extra_labels, extra_teacher, topped_up = [], [], [], 0
        if self.scope == "global":
            flt.fit(pool.images, pool.labels)
            keep_mask, adjusted = flt.judge(pool.images, pool.labels)
            teacher[:] = adjusted.to(teacher.dtype)
            cutoffs = {"global": flt.cutoff}
        else:
            sampler = None
            for i, label in enumerate(torch.unique(pool.labels).tolist()):
                members = torch.nonzero(pool.labels == label).flatten()
                burn_idx, candidates = members[:burn], members[burn:]
                flt.fit(pool.images[burn_idx], pool.labels[burn_idx])
                mask, adjusted = flt.judge(pool.images[candidates], pool.labels[candidates])
                teacher[candidates] = adjusted.to(teacher.dtype)
                kept = candidates[mask][:self.c.pool_per_class]
                keep_mask[kept] = True
                short, round_ = self.c.pool_per_class - len(kept), 1
                while short > 0:  # top up: sample and filter more
                    sampler = sampler or self._sampler()
                    more, _ = sampler.sample(label, max(short, self.c.sample_batch), seed=_seed(self.cfg.seed, i, round_))
                    more_labels = torch.full((len(more),), label, dtype=torch.int64)
                    mask, adjusted = flt.judge(more, more_labels)
                    more, adjusted = more[mask][:short], adjusted[mask][:short]
                    extra_images.append(more)
                    extra_labels.append(more_labels[:len(more)])
                    extra_teacher.append(adjusted.to(teacher.dtype))
                    short, round_, topped_up = short - len(more), round_ + 1, topped_up + len(more)
            cutoffs = {str(k): v for k, v in flt.cutoffs.items()}
        candidates = int(len(pool) - burn * len(torch.unique(pool.labels)))
        kept_images = torch.cat([pool.images[keep_mask], *extra_images])
        kept_labels = torch.cat([pool.labels[keep_mask], *extra_labels])
        kept_teacher = torch.cat([teacher[keep_mask], *extra_teacher])
        record = {"pool": len(pool), "candidates": candidates, "kept": int(len(kept_labels)),
                  "fraction_kept": int(keep_mask.sum()) / max(candidates, 1), "topped_up": topped_up}
        save_generated(stage.output, kept_images, kept_labels,
                       {**pool.provenance, "stage": "filter", **record, "cutoffs": cutoffs}, teacher_labels=kept_teacher)
        burn_mask = torch.zeros(len(pool), dtype=torch.bool)
        if burn:
            for label in torch.unique(pool.labels).tolist():
                burn_mask[torch.nonzero(pool.labels == label).flatten()[:burn]] = True
        self._grids(pool, keep_mask, burn_mask)
        return record

    def _stage_relabel(self, stage: StagePlan) -> dict:
        from .filtering import adjust_labels

        kept = load_generated(self.run_dir / "filter" / "kept.npz")
        labels = kept.labels
        changed = 0
        shift = 0.0  # regression: mean |new - conditioning label| in the data's unit
        if self.c.adjust and len(kept):
            new = kept.teacher_labels  # from the filter's pass; a store written without them: a fresh pass
            if new is None:
                new = adjust_labels(self._teacher(), kept.images, "ce" if self.classification else "abs_error")
            new = torch.as_tensor(new).to(labels.dtype).cpu()
            if self.classification:
                changed = int((new != labels).sum())
            else:
                label_map = self._label_map()
                shift = (label_map.to_original(new.double()) - label_map.to_original(labels.double())).abs().mean().item()
            labels = new
        if not self.classification:  # [0, 1] -> the data's unit (degrees, years)
            labels = self._label_map().to_original(labels.double())
            if self.c.integer_labels:  # the released UTKFace script casts ages to int (truncation)
                labels = labels.trunc()
        record = {"fakes": len(kept), "adjusted": self.c.adjust}
        record.update({"labels_changed": changed} if self.classification else {"mean_label_shift": round(shift, 4)})
        save_generated(stage.output, kept.images, labels, {**kept.provenance, "stage": "relabel",
                                                          "label_space": "class" if self.classification else "original",
                                                          **record})
        return record

    def _stage_mixed(self, stage: StagePlan) -> dict:
        fakes = load_generated(self.run_dir / "relabel" / "fakes.npz")
        real_images, _ = self._real_training_set()
        num_classes = int(self.cfg_num_classes()) if self.classification else None
        # balanced over the stored (teacher-adjusted) labels, as released: a class the teacher rarely
        # predicts gives what it has, and the record says which classes fell short
        keep = mixed.subsample(fakes.labels, self.c.num_fake, num_classes, self.cfg.seed)
        images = match_channels(fakes.images[keep], real_images)
        mean, std = mixed.pixel_stats(real_images, images)
        record = {"fakes": int(len(keep)), "real": int(len(real_images)), "mean": list(mean), "std": list(std),
                  "normalisation_used": self.recompute}
        if num_classes is not None:
            counts = torch.bincount(fakes.labels[keep].long(), minlength=num_classes).tolist()
            share = self.c.num_fake // num_classes
            record["short_classes"] = {str(c): n for c, n in enumerate(counts) if n < share}
        (stage.output.parent).mkdir(parents=True, exist_ok=True)
        stats_tmp = stage.output.parent / "normalisation.json.tmp"
        stats_tmp.write_text(json.dumps({"mean": list(mean), "std": list(std)}))
        os.replace(stats_tmp, stage.output.parent / "normalisation.json")
        save_generated(stage.output, images, fakes.labels[keep], {**fakes.provenance, "stage": "mixed", **record})
        return record

    def cfg_num_classes(self) -> int:
        from ..tasks import get_task

        return get_task(self.cfg.task).num_outputs(self.cfg)

    def _stage_student(self, stage: StagePlan) -> dict:
        return self._train(stage, self.student_config())

    # ------------------------------------------------------------------ reports
    def _grids(self, pool: GeneratedSet, kept_mask: torch.Tensor, burn_mask: torch.Tensor) -> None:
        """One PNG, three rows per class (per tenth of the label range for regression): generated
        (sampled) fakes, the accepted and the rejected ones among the filter's candidates."""
        from .gan import image_grid

        n = self.c.grid_per_class
        if self.classification:
            groups = pool.labels
        else:  # ten bins of the conditioning label
            groups = (pool.labels * 10).floor().clamp(0, 9).long()
        rows = []
        for g in torch.unique(groups).tolist():
            members = torch.nonzero(groups == g).flatten()
            candidates = members[~burn_mask[members]]
            accepted = candidates[kept_mask[candidates]][:n]
            rejected = candidates[~kept_mask[candidates]][:n]
            for chosen in (members[:n], accepted, rejected):
                row = torch.zeros(n, *pool.images.shape[1:], dtype=torch.uint8)
                row[:len(chosen)] = pool.images[chosen]
                rows.append(row)
        if not rows:
            return
        grid = image_grid(torch.cat(rows), rows=len(rows))
        _save_png(grid, self.run_dir / f"samples_{'per_class' if self.classification else 'per_angle_bin'}.png")

    def _read_summary(self) -> dict:
        path = self.run_dir / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else {"name": self.cfg.name, "version": self.version}

    def _write_summary(self, summary: dict) -> None:
        summary.update(settings=_settings(self.c), filter_scope=self.scope, student_init=self.init,
                       method=self.cfg.method.name)
        tmp = self.run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, self.run_dir / "summary.json")
        (self.run_dir / "summary.md").write_text(summary_markdown(summary))


# ---------------------------------------------------------------------- pieces


@dataclass(frozen=True)
class LabelMap:
    """Regression labels: the data's unit <-> the generator's [0, 1]: min-max of the real training
    targets, or y / max (low = 0) with ``regression.normalise: max``, the released CcGAN's scaling."""

    low: float
    high: float

    def to_unit(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.low) / (self.high - self.low)

    def to_original(self, y01: torch.Tensor) -> torch.Tensor:
        return y01 * (self.high - self.low) + self.low


def crop_and_flip(seed: int):
    """uint8 images -> uint8 images randomly cropped (4-pixel zero padding) and flipped: the
    training transform through which the final version's teacher scores the fakes (section 4.5.3)."""
    from ..data.augment import BatchAugment

    # mean 0 / std 1/255 turns the 0..1 scaling back into pixel values
    augment = BatchAugment(crop_padding=4, flip=True, mean=(0.0,), std=(1 / 255,))
    generator = torch.Generator().manual_seed(seed)
    return lambda images: augment(images, generator=generator).round_().clamp_(0, 255).to(torch.uint8)


def _seed(seed: int, label_index: int, round_: int) -> int:
    from ..data.loader import derive_seed

    return derive_seed(seed, 17, label_index, round_) % 2**62


def match_channels(fakes: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Grey fakes repeated to the real images' 3 channels (a grey GAN for a 3-channel set)."""
    if fakes.shape[1] == 1 and real.shape[1] == 3:
        return fakes.expand(-1, 3, -1, -1).contiguous()
    return fakes


def _settings(c) -> dict:
    return {k: v for k, v in c.model_dump(mode="json").items() if k not in ("nokd", "gan", "dre_extractor", "dre",
                                                                              "quick")}


def _brief(record: Optional[dict]) -> str:
    if not record:
        return ""
    keys = ("acceptance_rate", "kept", "fraction_kept", "fakes", "best_score")
    parts = [f"{k} {record[k]:.3g}" if isinstance(record[k], float) else f"{k} {record[k]}"
             for k in keys if record.get(k) is not None]
    return f" ({', '.join(parts)})" if parts else ""


def summary_markdown(summary: dict) -> str:
    lines = [f"# cGAN-KD run {summary.get('name')}", "",
             f"version {summary.get('version')}, filter {summary.get('filter_scope')}, student from "
             f"{summary.get('student_init')}, method {summary.get('method')}", "",
             "| stage | seconds | details |", "|---|---:|---|"]
    for name, entry in summary.get("stages", {}).items():
        details = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items()
                            if k != "seconds" and not isinstance(v, (dict, list)))
        lines.append(f"| {name} | {entry.get('seconds', 0):.1f} | {details} |")
    return "\n".join(lines) + "\n"


def _save_png(grid: torch.Tensor, path: Path) -> None:
    from PIL import Image

    array = grid.permute(1, 2, 0).numpy()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(path)


def run_pipeline(cfg: Config, quick: bool = False, progress: bool = True, dry_run: bool = False) -> Optional[dict]:
    """``reviewkd train`` on a cGAN-KD config."""
    pipeline = Pipeline(cfg, quick=quick, progress=progress)
    if dry_run:
        print(pipeline.describe())
        return None
    summary = pipeline.run()
    student = summary.get("stages", {}).get("student", {})
    print(f"{pipeline.cfg.name}: cGAN-KD student {student.get('score_key', '')} {student.get('best_score')}; "
          f"summary in {pipeline.run_dir / 'summary.md'}")
    return summary


__all__ = ["LabelMap", "Pipeline", "crop_and_flip", "match_channels", "run_pipeline", "summary_markdown"]
