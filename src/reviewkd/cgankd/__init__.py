"""cGAN-KD: knowledge passed from a teacher to a student through cGAN-generated samples.

One ``reviewkd train`` on a recipe with a ``cgankd:`` section runs the pipeline (``pipeline.py``),
each stage in its own folder, skipped when done and resumed after a kill: the NOKD student -> the
filter teacher -> a conditional GAN (``gan.py``; CcGAN for continuous labels) -> the DRE feature
extractor (a classifier, or the sparse autoencoder for regression) -> the density-ratio model
(``dre.py``) -> rejection sampling per label (``sampling.py``) -> the teacher's filter and relabelling
(``filtering.py``) -> generated data stored with provenance (``store.py``) -> the student trained on
real + generated data (``mixed.py``) with CE / MSE alone or any registered method.

No imports here: ``reviewkd.models`` imports ``cgankd.dre`` to register the extractors.
"""
