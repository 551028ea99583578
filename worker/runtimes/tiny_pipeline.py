"""``farm models tiny --out DIR``: a tiny Stable Diffusion pipeline with random weights, for tests, the demo
and benchmarks.

Responsibility: build a complete ``StableDiffusionPipeline`` (UNet2DConditionModel, AutoencoderKL,
CLIPTextModel, CLIPTokenizer, a scheduler) from small configs and save it with ``save_pretrained``, so
that every other part of the farm loads it with ``from_pretrained(DIR)`` exactly like a real model folder.
No file is downloaded: the tokenizer's ``vocab.json`` and ``merges.txt`` are written here (CLIP's byte
level BPE alphabet plus merges for a few hundred prompt words).

Invariants:

* deterministic: the weights come from a fixed seed in a forked RNG, and the files carry no dates, so two
  builds with the same library versions give byte-identical folders (the same model hash);
* small: about a million parameters; a 64x64 image in a few steps takes tens of milliseconds on a CPU;
* the VAE downsamples by 8 and the text encoder takes 77 tokens, like SD 1.x, so sizes and prompt limits
  are validated exactly as for a real model.

:func:`build_lora` writes random LoRA weights for that pipeline (``farm models tiny-lora``),
:func:`build_controlnet` a random ControlNet (``farm models tiny-controlnet``), :func:`build_upscaler` a tiny x4
``StableDiffusionUpscalePipeline`` (``farm models tiny-upscaler``) and :func:`build_embedding` a random
textual-inversion embedding (``farm models tiny-embedding``), the same way.

Only this module, :mod:`worker.runtimes.diffusion` and the tests import torch; the worker daemon never does.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

SEED = 20240601
"""Seed of the random weights (any fixed value; changing it changes the tiny model's hash)."""

MAX_TOKENS = 77
"""Tokens the text encoder takes, start and end tokens included (CLIP ViT-L/14, as in SD 1.x)."""

# Words that get whole-word BPE merges, so ordinary prompts take about one token per word (like the real
# CLIP vocabulary) instead of one per character.
WORDS = """
a an the of in on at by with and or to from for over under into through near far above below behind
photo photograph painting drawing sketch illustration render rendering portrait landscape still life
watercolor oil acrylic ink pencil charcoal pastel digital art style styled concept matte cinematic
lighting light dark bright soft hard warm cold golden hour sunset sunrise dusk dawn night day morning
evening noon storm rain snow fog mist cloud clouds sky sun moon stars star city street town village
house castle tower bridge road river lake sea ocean beach island mountain mountains hill forest tree
trees flower flowers garden field desert cave waterfall ship boat car train plane robot dragon knight
cat dog bird horse fox wolf owl fish man woman child girl boy old young face eyes hair hat dress
red orange yellow green blue purple pink brown black white gray grey silver gold colorful vivid pale
highly detailed intricate sharp focus bokeh wide angle close up macro aerial view shot lens mm film
grain vintage retro futuristic ancient medieval modern fantasy science fiction surreal abstract
minimal minimalist epic beautiful dramatic moody calm peaceful quiet busy crowded empty lonely
turntable monkey suzanne blender cycles eevee frame sequence animation stylized stylised toon
cartoon anime comic noir gothic baroque impressionist impressionism cubism pop neon glow glowing
blurry blur low quality ugly deformed extra bad worst jpeg artifacts watermark text signature
trending artstation unreal engine octane volumetric ray tracing studio by artist masterpiece best
""".split()


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters (the BPE alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer_files() -> tuple[dict[str, int], list[str]]:
    """The vocabulary and merges of the tiny tokenizer, in CLIP's format."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    seen_merges: set[str] = set()
    known = set(tokens)
    for word in dict.fromkeys(WORDS):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        cur = parts[0]
        for nxt in parts[1:]:  # merge left to right: "w a", "wa t", "wat e", …
            merge = f"{cur} {nxt}"
            cur += nxt
            if merge not in seen_merges:
                seen_merges.add(merge)
                merges.append(merge)
            if cur not in known:
                known.add(cur)
                tokens.append(cur)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer_source(folder: Path) -> None:
    """vocab.json and merges.txt as the original CLIP release ships them."""
    vocab, merges = tokenizer_files()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def _tokenizer():
    """The tiny CLIP tokenizer (from :func:`write_tokenizer_source`'s files), 77 tokens."""
    from transformers import CLIPTokenizer
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_source(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=MAX_TOKENS)


def _text_config(tokenizer):
    """A 2-layer CLIP text encoder of width 32 over ``tokenizer``'s vocabulary."""
    from transformers import CLIPTextConfig
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=32,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def _vae(blocks: tuple[int, ...], **extra):
    """A tiny AutoencoderKL: one block per entry of ``blocks``, so it scales by 2 ** (len(blocks) - 1)."""
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                         block_out_channels=blocks, sample_size=64, down_block_types=("DownEncoderBlock2D",) * len(blocks),
                         up_block_types=("UpDecoderBlock2D",) * len(blocks), **extra)


def _save(pipe, out: Path) -> Path:
    """``pipe.save_pretrained`` into ``out`` (replaced): written beside it, then renamed, so a half-written
    folder never carries the model's name."""
    tmp_out = out.with_name(out.name + ".building")
    shutil.rmtree(tmp_out, ignore_errors=True)
    pipe.save_pretrained(tmp_out, safe_serialization=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp_out.rename(out)
    return out


def build(out: Path, inpaint: bool = False) -> Path:
    """Build the tiny pipeline and save it into ``out`` (replaced if it exists). Returns ``out``. With
    ``inpaint``: a ``StableDiffusionInpaintPipeline`` whose UNet takes 9 channels (latents, mask, masked
    image latents), like SD's inpainting checkpoints."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from diffusers import (
        PNDMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    out = Path(out)
    tokenizer = _tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=9 if inpaint else 4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        vae = _vae((8, 16, 16, 16))  # four blocks: downsamples by 8 like SD's VAE
        text_encoder = CLIPTextModel(_text_config(tokenizer))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    cls = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
    pipe = cls(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
               scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return _save(pipe, out)


def build_xl(out: Path) -> Path:
    """A tiny Stable Diffusion XL pipeline (two text encoders, a UNet with SDXL's text-time embedding), saved
    into ``out`` like :func:`build`. The UNet's cross-attention takes both encoders' hidden states (32 + 32)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    out = Path(out)
    tokenizer = _tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(  # time ids: 6 × 8, plus the pooled text embedding of 32
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64)
        vae = _vae((8, 16, 16, 16))
        te, te2 = CLIPTextModel(_text_config(tokenizer)), CLIPTextModelWithProjection(_text_config(tokenizer))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae.eval(), text_encoder=te.eval(), text_encoder_2=te2.eval(),
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet.eval(), scheduler=scheduler)
    return _save(pipe, out)


def build_lora(model: Path, out: Path, seed: int = 1, rank: int = 4) -> Path:
    """Random LoRA weights (rank ``rank``) for the attention layers of ``model``'s UNet and text encoder,
    saved by diffusers' ``save_lora_weights`` as the safetensors file ``out`` (``models/loras/NAME.safetensors``).
    The up-projections are random too (peft starts them at zero), so the LoRA visibly changes the images."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    out = Path(out)
    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = {}
        for key, module, targets in (("unet_lora_layers", pipe.unet, ["to_q", "to_k", "to_v", "to_out.0"]),
                                     ("text_encoder_lora_layers", pipe.text_encoder,
                                      ["q_proj", "k_proj", "v_proj", "out_proj"])):
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), module)
            for name, param in module.named_parameters():
                if "lora_" in name:
                    torch.nn.init.normal_(param, std=0.5 if "lora_B" in name else 1 / rank)
            layers[key] = get_peft_model_state_dict(module)
    out.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(out.parent, weight_name=out.name, safe_serialization=True, **layers)
    return out


def build_controlnet(model: Path, out: Path, seed: int = 1) -> Path:
    """A random ControlNet for ``model``'s UNet (``ControlNetModel.from_unet``, its zero convolutions made
    random so that the control image visibly steers the images), saved as the folder ``out``
    (``models/controlnets/NAME``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(model) / "unet", local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ControlNetModel.from_unet(unet)
        for block in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            for param in block.parameters():
                torch.nn.init.normal_(param, std=0.3)
    net.save_pretrained(out, safe_serialization=True)
    return Path(out)


def build_upscaler(out: Path) -> Path:
    """A tiny x4 ``StableDiffusionUpscalePipeline`` (its VAE upsamples by 4, its UNet takes the 4 latents plus
    the 3 channels of the low-resolution image and embeds the noise level as a class), saved into ``out``
    (``models/upscalers/NAME``) like :func:`build`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    out = Path(out)
    tokenizer = _tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + 4)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=7, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4, num_class_embeds=400,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
        vae = _vae((8, 8, 16), scaling_factor=0.08333)  # latents at a quarter of the image size, as in the x4 upscaler
        text_encoder = CLIPTextModel(_text_config(tokenizer))
    pipe = StableDiffusionUpscalePipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
        low_res_scheduler=DDPMScheduler(beta_schedule="scaled_linear"),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction"), max_noise_level=350)
    return _save(pipe, out)


def build_refiner(out: Path) -> Path:
    """A tiny SDXL refiner: a ``StableDiffusionXLImg2ImgPipeline`` with only the second text encoder (as
    stabilityai's refiner), a UNet whose text-time embedding takes the aesthetic score (5 time ids × 8 + the
    pooled 32) and cross-attention of that encoder's 32, saved into ``out`` (``models/refiners/NAME``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    out = Path(out)
    tokenizer = _tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + 5)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=5 * 8 + 32, cross_attention_dim=32)
        vae = _vae((8, 16, 16, 16))
        te2 = CLIPTextModelWithProjection(_text_config(tokenizer))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLImg2ImgPipeline(vae=vae.eval(), text_encoder=None, text_encoder_2=te2.eval(),
                                            tokenizer=None, tokenizer_2=tokenizer, unet=unet.eval(),
                                            scheduler=scheduler, requires_aesthetics_score=True,
                                            force_zeros_for_empty_prompt=False)
    return _save(pipe, out)


def build_embedding(out: Path, seed: int = 1, vectors: int = 2, width: int = 32, xl: bool = False) -> Path:
    """A random textual-inversion embedding of ``vectors`` vectors for the tiny pipeline's text encoder
    (width 32), saved as the safetensors file ``out`` (``models/embeddings/NAME.safetensors``, key
    ``emb_params`` as A1111 writes it); with ``xl`` one for the tiny SDXL pipeline (``clip_l`` and ``clip_g``,
    one per text encoder, as SDXL embeddings are published)."""
    import torch
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tensors = {"clip_l": torch.randn(vectors, width), "clip_g": torch.randn(vectors, width)} if xl else \
            {"emb_params": torch.randn(vectors, width)}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out))
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="farm models tiny", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="model folder to write (its name is the model's name)")
    ap.add_argument("--inpaint", action="store_true", help="an inpainting pipeline (9-channel UNet)")
    args = ap.parse_args(argv)
    path = build(Path(args.out), inpaint=args.inpaint)
    print(f"tiny Stable Diffusion pipeline written to {path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
