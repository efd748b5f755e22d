"""Key mapping between diffusers' WanTransformer3DModel and the original Wan2.1 state-dict layout.

Pure renaming: tensors are passed through untouched. Covers T2V and I2V/FLF2V transformers.
Note the norm swap: original Wan calls the cross-attention LayerNorm `norm3` and the FFN norm `norm2`;
diffusers calls them `norm2` and `norm3` (only the cross-attention one has weights).
"""

import re

# top-level names (prefix match on the whole key), diffusers -> Wan
_TOP = {
    "condition_embedder.time_embedder.linear_1.": "time_embedding.0.",
    "condition_embedder.time_embedder.linear_2.": "time_embedding.2.",
    "condition_embedder.text_embedder.linear_1.": "text_embedding.0.",
    "condition_embedder.text_embedder.linear_2.": "text_embedding.2.",
    "condition_embedder.time_proj.": "time_projection.1.",
    "condition_embedder.image_embedder.norm1.": "img_emb.proj.0.",
    "condition_embedder.image_embedder.ff.net.0.proj.": "img_emb.proj.1.",
    "condition_embedder.image_embedder.ff.net.2.": "img_emb.proj.3.",
    "condition_embedder.image_embedder.norm2.": "img_emb.proj.4.",
    "proj_out.": "head.head.",
    "patch_embedding.": "patch_embedding.",
}
_TOP_EXACT = {
    "scale_shift_table": "head.modulation",
    "condition_embedder.image_embedder.pos_embed": "img_emb.emb_pos",
}
# names inside blocks.N. (prefix match on the rest of the key), diffusers -> Wan
_BLOCK = {
    "norm2.": "norm3.",
    "ffn.net.0.proj.": "ffn.0.",
    "ffn.net.2.": "ffn.2.",
}
_BLOCK_EXACT = {"scale_shift_table": "modulation"}
# names inside an attention module, diffusers -> Wan
_ATTN = {
    "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "o.",
    "norm_q.": "norm_q.", "norm_k.": "norm_k.",
    "add_k_proj.": "k_img.", "add_v_proj.": "v_img.", "norm_added_k.": "norm_k_img.",
}
# diffusers registers this I2V key but never uses it (it is listed in _keys_to_ignore_on_load_unexpected)
_DROP = ("norm_added_q.",)
_ATTN_NAMES = {"attn1.": "self_attn.", "attn2.": "cross_attn."}
_BLOCK_RE = re.compile(r"^(blocks\.\d+\.)(.*)$")


def _swap(name: str, table: dict, exact: dict) -> str | None:
    if name in exact:
        return exact[name]
    for src, dst in table.items():
        if name.startswith(src):
            return dst + name[len(src):]
    return None


def _invert(table: dict) -> dict:
    return {v: k for k, v in table.items()}


def _rename(key: str, top, top_exact, block, block_exact, attn, attn_names) -> str:
    m = _BLOCK_RE.match(key)
    if m is None:
        new = _swap(key, top, top_exact)
        if new is None:
            raise KeyError(f"unknown Wan transformer key {key!r}")
        return new
    head, rest = m.groups()
    for a_src, a_dst in attn_names.items():
        if rest.startswith(a_src):
            inner = _swap(rest[len(a_src):], attn, {})
            if inner is None:
                raise KeyError(f"unknown Wan attention key {key!r}")
            return head + a_dst + inner
    new = _swap(rest, block, block_exact)
    if new is None:
        raise KeyError(f"unknown Wan block key {key!r}")
    return head + new


def diffusers_to_wan(state_dict: dict) -> dict:
    """Rename a diffusers WanTransformer3DModel state dict to original Wan2.1 key names."""
    out = {}
    for k, v in state_dict.items():
        if any(d in k for d in _DROP):
            continue
        out[_rename(k, _TOP, _TOP_EXACT, _BLOCK, _BLOCK_EXACT, _ATTN, _ATTN_NAMES)] = v
    return out


def wan_to_diffusers(state_dict: dict) -> dict:
    """Rename an original Wan2.1 state dict to diffusers WanTransformer3DModel key names."""
    return {
        _rename(k, _invert(_TOP), _invert(_TOP_EXACT), _invert(_BLOCK), _invert(_BLOCK_EXACT),
                _invert(_ATTN), _invert(_ATTN_NAMES)): v
        for k, v in state_dict.items()
    }


_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")


def is_diffusers_layout(state_dict: dict) -> bool:
    """True when the keys look like diffusers' WanTransformer3DModel (rather than original Wan2.1)."""
    return any(k.startswith(("condition_embedder.", "proj_out.")) or ".attn1." in k for k in state_dict)


def normalize_wan_state_dict(state_dict: dict) -> dict:
    """Strip a ComfyUI-style `model.diffusion_model.` prefix and convert diffusers names to Wan names."""
    for p in _PREFIXES:
        if state_dict and all(k.startswith(p) for k in state_dict):
            state_dict = {k[len(p):]: v for k, v in state_dict.items()}
            break
    return diffusers_to_wan(state_dict) if is_diffusers_layout(state_dict) else dict(state_dict)
