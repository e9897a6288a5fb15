"""cGAN-KD: knowledge passed from a teacher to a student through cGAN-generated samples,
subsampled by density-ratio rejection sampling, filtered and relabelled by the teacher."""
