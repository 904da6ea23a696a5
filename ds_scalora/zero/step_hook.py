"""The one window in a DeepSpeed step where a method may rewrite factors, gradients and moments.

``engine.optimizer.step`` is wrapped (an instance attribute): DeepSpeed calls it once per optimizer
step, at the gradient-accumulation boundary, after the gradients are reduced and before the ZeRO step
clips them, updates the fp32 masters and copies them into the model's low-precision weights (see
shared/research/deepspeed-zero.md §2, §7). Without ZeRO (fp32), DeepSpeed clips in the engine before
``optimizer.step()``, so the clip is wrapped too and whichever comes first runs the callback. It
works the same under a hand-written loop, HF Trainer and Accelerate.
"""

from __future__ import annotations


def install_step_hook(engine, kind: str, callback, after=None) -> None:
    """Call ``callback(global_step)`` once per optimizer step, inside the window, then ``after()`` (the
    state access's write-back of the gradients it handed out). One hook per engine."""
    opt = engine.optimizer
    if getattr(opt, "_ds_scalora_wrapped", False):
        raise RuntimeError("this engine already has a ds_scalora controller attached (one method per engine)")
    last = {"step": None}

    def once():
        step = engine.global_steps
        if last["step"] != step:
            last["step"] = step
            try:
                callback(step)
            finally:
                if after is not None:
                    after()

    original = opt.step

    def step(*args, **kwargs):
        once()
        return original(*args, **kwargs)

    opt.step = step
    opt._ds_scalora_wrapped = True
    if kind == "plain":
        clip = engine.clip_fp32_gradients

        def clip_after_hook(*args, **kwargs):
            once()
            return clip(*args, **kwargs)

        engine.clip_fp32_gradients = clip_after_hook
