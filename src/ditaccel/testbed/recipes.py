"""The training recipes of the testbed models: optimiser and schedule settings, data chunking,
and the toy sizes of the CPU tests (``ditaccel.testbed.train`` and its modules read them).

Recipe (both generators): AdamW (betas 0.9/0.99, no weight decay), linear warm-up then cosine
decay to 10% of the peak learning rate over ``steps`` (given, or fitted to the time budget from
the measured step rate: ``training.StepPlan``), gradient clipping at 1, EMA of the weights (decay
0.999 with the usual ``(1 + n) / (10 + n)`` warm-up; the EMA weights are the ones saved), bf16
autocast on CUDA (fp32 master weights), adaLN-Zero initialisation (modulation and output
projections zero, as in the DiT paper), training timesteps half uniform and half logit-normal
around 0.38 T (image) or 0.5 T (video) (``training.sample_timesteps``), 10% condition dropout for
classifier-free guidance (the null class / the empty caption, which is what the pipelines feed as
the unconditional input); the video model's q/k LayerNorm weights start at 1.5 (``qk_norm_init``).

* Image: v-prediction (``prediction_type="epsilon"``, the DiT paper's target, is selectable) on
  the released DiT schedule, plain MSE on v (``min_snr_gamma`` sets min-SNR-γ weighting). In
  pixel space an epsilon prediction must be divided by sqrt(ᾱ) ≈ 0.006 at the noisiest step to
  give the image, so its errors there set wrong global colours (seen in a 3-minute H100 trial of
  epsilon + min-SNR-5); a v prediction is the image there.
* Video: v-prediction on the released CogVideoX-2b schedule (zero terminal SNR, SNR shift 3),
  plain MSE on v (= CogVideoX's x0 loss weighted by 1/(1-ᾱ)).

``toy=True`` shrinks everything (16x16 px, a couple of tiny layers, batch 4) for CPU tests: the
``TOY_*`` records. The comment below is the record of the runs behind these numbers.
"""

__all__ = [
    "CLASSIFIER_RECIPE",
    "DATA_CHUNK",
    "IMAGE_RECIPE",
    "TOY_IMAGE_MODEL",
    "TOY_RECIPE",
    "TOY_TEXT_ENCODER",
    "TOY_VIDEO_MODEL",
    "VIDEO_RECIPE",
]

# Measured on one H100 (torch 2.11, bf16, 2026-11-24/25):
# * speed, alone on the GPU: the image DiT at batch 128 ran 15.5 steps/s eager and 24.7 under
#   torch.compile (hence compile on CUDA by default), and 32-33 once its batches were rendered in
#   chunks without device syncs (``DATA_CHUNK``, CPU class indices) with a fused AdamW; sharing the
#   GPU with the video run, 16.1 (image) and 5.3-5.9 (video at 8x48x48, batch 32) steps/s. The
#   classifiers train in 30-40 s each and reach 100% on fresh procedural data.
# * first trained set (16x64x64 video at patch 4, lr 3e-4, uniform t): epsilon + min-SNR-5 gave
#   wrong global colours (classifier accuracy 3%); v-prediction after ~10.5k image steps scored
#   43-50% and the video 3-6% (object and motion).
# * shipped set (this recipe; dense samples, 96 seeds, float32, 20 steps): the image DiT scored
#   84.4% after 15.8k steps in 17 min sharing the GPU and 92.7% after 4.7k more alone (2.5 min,
#   ``--init``). An image run at lr 5e-4 alone reached 97.9% on its 48-sample probe after 14k
#   steps (8 min), then went to NaN. Video (object / motion / colour / background): 52/40/100/85%
#   after 5.1k steps in 17 min sharing the GPU (t centred at 0.38 T, objects of radius 0.2-0.3);
#   alone for 19 min (12.3k steps, 11.8 steps/s) with t centred at 0.5 T, 42/65/100/100%; the
#   next, with objects of radius 0.30-0.42, 56/100/100/80% (12.5k steps, 19 min alone): shapes
#   came out soft. With ``qk_norm_init=1.5`` as well, 71/100/98/99% (12.4k steps; at 5 minutes
#   motion was already 100%, against 23% without); with objects of radius 0.36-0.46 as well (the
#   12.5k steps, 19 min alone), 79/100/100/94% on 96 samples and 76/100/100/94% on 384 (FD 11.5;
#   20.5 for the 0.30-0.42 run). Squares were the shapes it missed (45% recognised, the rest read
#   as circles over stripes and checkerboards; circles 100%, triangles 82%, crosses 77%). The
#   shipped one: squares of half-side 0.9 r (was 0.82 r) and 3 heads x 64 (was 6 x 32, same
#   width; 16.6 compiled steps/s against 11.3): 18.2k steps in 19 min alone, 98.2/100/99.5/99.7%
#   on 384 samples (FD 2.2); its probes read object 65/83/94/98% at 5/10/15/19 min.
# ``info["steps_per_s"]`` reports the rate of a run, ``info["curve"]`` its learning curve.
# Recipe changes for the shipped set: peak lr 3e-4 -> 5e-4 for the video model (a 4.6 M-parameter
# model, ~10-30k steps: the DiT paper's 1e-4 is for 100x the parameters and the steps) and 4e-4
# for the image DiT (no q/k norm: at 5e-4 its loss went to NaN after 22k steps, having scored 98%
# at 14k); half the training timesteps drawn logit-normal around t = 0.38 T (``t_logit_frac`` /
# ``t_logit_mean``; the other half stay uniform): uniform t spends 40% of a batch at SNR < 0.03,
# where the loss is nearly irreducible; EDM and SD3 centre theirs at SNR ~1-10.
# The video model centres its logit-normal half at t = 0.5 T (SNR 0.1 under the CogVideoX schedule)
# instead: an object of ~100 pixels is located, and so its path (the caption's motion) decided, at
# per-pixel SNR ~0.01-0.3, and the first video run (centred at 0.38 T) drew the same path for
# every motion word (scripts/probe_video_caption.py) while it had learned colour and background.
IMAGE_RECIPE = dict(steps=16000, batch_size=128, lr=4e-4, warmup=500, label_dropout=0.1, min_snr_gamma=None,
                    ema_decay=0.999, prediction_type="v_prediction", t_logit_frac=0.5, t_logit_mean=-0.5)
VIDEO_RECIPE = dict(steps=8000, batch_size=32, lr=5e-4, warmup=500, caption_dropout=0.1, ema_decay=0.999,
                    t_logit_frac=0.5, t_logit_mean=0.0, qk_norm_init=1.5)
# Procedural batches are rendered DATA_CHUNK training batches at a time (one vectorised render
# instead of many small ones).
DATA_CHUNK = 16
CLASSIFIER_RECIPE = dict(image_steps=1500, image_batch_size=256, video_steps=1500, video_batch_size=48, lr=2e-3,
                         eval_samples=1024)

# Toy sizes for CPU tests: same architectures, tiny.
TOY_IMAGE_MODEL = dict(sample_size=16, num_layers=2, num_attention_heads=2, attention_head_dim=8)
TOY_VIDEO_MODEL = dict(num_layers=1, num_attention_heads=2, attention_head_dim=8, sample_width=16, sample_height=16,
                       sample_frames=4, patch_size=2, text_embed_dim=16, time_embed_dim=16)
TOY_TEXT_ENCODER = dict(d_model=16, d_kv=4, d_ff=32, num_heads=4, num_layers=1)
TOY_RECIPE = dict(steps=3, batch_size=4, warmup=1)
