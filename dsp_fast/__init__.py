"""dsp_fast: a fast, faithful trainer for DSP (Dual Soft-Paste) unsupervised domain adaptation."""

__version__ = "0.1.0"
