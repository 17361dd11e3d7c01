"""Baseline peaks measured on the project's H100 before slimfit existed (GiB).

H100 80GB, torch 2.11, transformers 5.17; batch 128, random init, AdamW, peak =
torch.cuda.max_memory_allocated after a warm-up step. `slimfit plan` is validated against
them, and a bench run that strays far from them points at a changed environment.
"""

REFERENCE_PEAKS_GIB = {
    ("bert-base-seqcls", "full-fp32-eager"): 13.5,
    ("bert-base-seqcls", "full"): 7.67,
    ("bert-base-seqcls", "ckpt"): 2.59,
    ("bert-base-seqcls", "lora"): 5.20,
    ("bert-base-seqcls", "freeze-only"): 5.84,
    ("bert-base-qa", "full-fp32-eager"): 52.9,
    ("bert-base-qa", "full"): 20.0,
    ("bert-base-qa", "ckpt"): 5.14,
    ("bert-base-qa", "lora"): 14.3,
    ("bert-base-qa", "freeze-only"): 14.0,
    ("vit-base", "full-fp32-eager"): 18.2,
    ("vit-base", "full"): 10.4,
    ("vit-base", "ckpt"): 2.94,
    ("vit-base", "freeze-only"): 7.15,
}
