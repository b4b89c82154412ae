"""Decoding's machinery: chat prompts to ids and ids to replies, the prompts' keys and values
computed once, and the decoding step compiled with a static cache (--compile, on CUDA GPUs by
default)."""

import functools

import torch
from transformers import StaticCache

from machinery.logs import say_once


def end_of_reply_ids(model, tokenizer) -> torch.Tensor:
    """[E] every id that ends a reply: the model's (a chat model may have several; Qwen2.5: 2),
    and the tokenizer's EOS."""
    ids = model.generation_config.eos_token_id
    ids = [*(ids if isinstance(ids, list) else [ids]), tokenizer.eos_token_id]
    device = next(model.parameters()).device
    return torch.tensor(sorted({i for i in ids if i is not None}), device=device)


def encode_prompts(tokenizer, prompts: list[list[dict]], device):
    """(ids, mask) [P, Tp]: each chat through the model's chat template, left-padded."""
    texts = [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    encoded = tokenizer(
        texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    ).to(device)
    return encoded.input_ids, encoded.attention_mask


def decode_replies(tokenizer, completion_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Each completion's text, up to its end-of-reply token, without special tokens."""
    lengths = mask.sum(dim=1).tolist()  # [B]
    return [
        tokenizer.decode(ids[:n], skip_special_tokens=True)
        for ids, n in zip(completion_ids, lengths)
    ]


def prompt_cache(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, repeats: int):
    """Keys and values of each prompt but its last token, computed once and repeated for its G
    completions. The pass that takes the cache feeds the last token: it predicts the first one."""
    position_ids = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding: real tokens only
    cache = model.get_decoder()(
        input_ids=prompt_ids[:, :-1],
        attention_mask=prompt_mask[:, :-1],
        position_ids=position_ids[:, :-1],
        use_cache=True,
    ).cache
    cache.batch_repeat_interleave(repeats)  # row i of the cache is prompt i // repeats
    return cache


def shared_prompt(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, Tp: int):
    """(Tp - 1, its cache) if all rows share a prompt of Tp > 1 tokens, else (0, None); (0, None)
    under checkpointing too, so that all passes compute alike."""
    prompts = torch.stack([input_ids[:, :Tp], attention_mask[:, :Tp]])  # [2, B, Tp]
    one_prompt = len(input_ids) > 1 and Tp > 1 and bool((prompts == prompts[:, :1]).all())
    checkpointed = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    if not one_prompt or checkpointed:
        return 0, None
    cache = prompt_cache(model, input_ids[:1, :Tp], attention_mask[:1, :Tp], len(input_ids))
    return Tp - 1, cache


def decoder_for(model, cache, attention_mask: torch.Tensor, compiled: bool):
    """(decoder, cache, attention mask) of the decoding loop: the model's own decoder, or with
    `compiled` its compiled one over a static copy of the cache."""
    if compiled:
        return compiled_decoding(model, cache, attention_mask)
    return model.get_decoder(), cache, attention_mask


def compiled_decoding(model, cache, attention_mask: torch.Tensor, bucket: int = 256):
    """The prompts' cache copied into a static one of L >= Tp + T slots (a multiple of `bucket`),
    the mask padded to L, and the decoder compiled: each step of B rows has the same shapes."""
    if any(layer.is_sliding for layer in cache.layers):  # its cache keeps a window, not the prompt
        say_once("--compile: this model has sliding-window attention layers: decoding runs eager")
        return model.get_decoder(), cache, attention_mask
    B = len(attention_mask)
    L = -(-attention_mask.shape[1] // bucket) * bucket
    decoder, caches, shapes = compiled_decoder(model)  # a CUDA graph holds its cache's tensors
    for key in [key for key in caches if key[0] != B]:  # another batch size's (evaluation's, or
        del caches[key]  # training's): freed, and made again if it comes back
    key = (B, L, cache.layers[0].keys.dtype)
    shapes.add(key)
    static = caches.setdefault(key, StaticCache(model.config, L))
    if len(shapes) > torch._dynamo.config.cache_size_limit:  # past it, dynamo runs it eager
        say_once(
            "--compile: more batch shapes than torch compiles for one function: decoding runs "
            "uncompiled, slower than --no-compile. Use --no-compile."
        )
    static.reset()
    for i, layer in enumerate(cache.layers):
        static.update(layer.keys, layer.values, i)
    mask = torch.nn.functional.pad(attention_mask, (0, L - attention_mask.shape[1]))  # [B, L]
    return decoder, static, mask


@functools.cache  # once per model (train frees it): on CUDA as CUDA graphs (one launch per step)
def compiled_decoder(model):
    mode = "reduce-overhead" if next(model.parameters()).is_cuda else None
    return torch.compile(model.get_decoder(), mode=mode, dynamic=False), {}, set()
