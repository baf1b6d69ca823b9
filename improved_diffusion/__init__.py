"""
improved-diffusion: Improved Denoising Diffusion Probabilistic Models
(Nichol & Dhariwal, 2021), compatible with OpenAI's original code (flags,
checkpoints, sample files) and tested against its numbers.
"""
