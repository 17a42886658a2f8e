"""The output layer and the token cross-entropy in one pass over chunks of tokens, so the
``[tokens, vocab]`` logits (and their fp32 copy, log-softmax and gradient) never exist whole.

``model.fused_cross_entropy: true`` selects it (GPT family). Each chunk's logits are made, turned
into the chunk's loss and its logit gradient ``softmax − onehot`` straight away, and multiplied back
into the gradients of the hidden states and of the output weight, all inside the forward pass (the
idea of Liger-Kernel's fused linear cross-entropy); backward only scales what was kept. The matmuls
are the same three per token as unfused (logits, input gradient, weight gradient): nothing is
recomputed. What stays in memory is the hidden-state gradient ``[tokens, hidden]``, the weight
gradient ``[vocab, hidden]`` (fp32) and one chunk of logits, instead of several ``[tokens, vocab]``
tensors (for GPT-2's 50k vocabulary and 8k tokens: about 0.4 GB instead of about 5 GB).

Numerics follow the unfused path (``vocab_logits`` then ``lm_cross_entropy``): logits in the
compute dtype (autocast's, else the input's), softmax and loss in fp32, the logit gradient cast to
the compute dtype for the two gradient matmuls. What differs is summation order: the weight
gradient is summed over chunks in fp32.
"""

from __future__ import annotations

import torch

from toolkit.models.common.loss import IGNORE_INDEX

CHUNK_ELEMENTS = 2**26  # logits per chunk (tokens × padded vocab): 256 MiB in fp32


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                         chunk_tokens: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` against ``labels`` (``-100`` ignored), padded vocabulary
    columns (``vocab_size`` and up) excluded; ``h`` [..., hidden], ``labels`` [...], ``weight``
    [padded_vocab, hidden] (plain tensors). ``chunk_tokens`` defaults to ``CHUNK_ELEMENTS / vocab``."""
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    chunk = chunk_tokens or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropy.apply(h.flatten(0, -2), weight, labels.flatten(), vocab_size, dtype, chunk)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                dtype: torch.dtype, chunk: int) -> torch.Tensor:
        # h [n, hidden], weight [padded_vocab, hidden], labels [n]
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)  # [padded_vocab, hidden]: the one cast autocast would make
            valid = labels != IGNORE_INDEX  # [n]
            inv_count = 1.0 / valid.sum().float()  # the mean's divisor, as a tensor (no host sync)
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
            grad_w = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                      if ctx.needs_input_grad[1] else None)
            for start in range(0, h.shape[0], chunk):
                stop = min(start + chunk, h.shape[0])
                hc = h[start:stop].to(dtype)  # [c, hidden]
                logits = (hc @ w.T).float()  # [c, padded_vocab], rounded to the compute dtype first
                logits[:, vocab_size:] = float("-inf")
                lse = torch.logsumexp(logits, dim=-1)  # [c]
                ok = valid[start:stop]  # [c]
                target = labels[start:stop].clamp(min=0)[:, None]  # [c, 1]
                loss += ((lse - logits.gather(1, target).squeeze(1)) * ok).sum()
                if grad_h is None and grad_w is None:
                    continue
                grad = torch.exp_(logits.sub_(lse[:, None]))  # softmax, in place of the logits
                grad.scatter_add_(1, target, -ok[:, None].float())  # − onehot on counted tokens
                grad.mul_((ok.float() * inv_count)[:, None])  # ignored tokens: 0; the mean's 1/n
                grad = grad.to(dtype)  # [c, padded_vocab]
                if grad_h is not None:
                    grad_h[start:stop] = (grad @ w).to(h.dtype)  # [c, hidden]
                if grad_w is not None:
                    grad_w += (grad.T @ hc).float()  # [padded_vocab, hidden]
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if grad_w is not None else None)
        return loss * inv_count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss if grad_h is not None else None,
                grad_w * grad_loss if grad_w is not None else None, None, None, None, None)
