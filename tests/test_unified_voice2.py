"""unified_voice2 (Tortoise / DLAS GPT): golden outputs, checkpoint layout, training rules,
generation with and without the KV cache, checkpointing, options and the .pth export."""

from __future__ import annotations

import pytest
import torch

from models.audio.tts.unified_voice2 import UnifiedVoice2
from models.export import main as export_main
from tortoise_golden import GOLDEN, compare_dlas, compare_tortoise, table
from utils.errors import run_command
from utils.io import CheckpointError, load_module, save_network
from utils.schema import Problems, bind_options

needs_golden = pytest.mark.skipif(
    not (GOLDEN / "unified_voice_tiny.pth").is_file(), reason=f"no fixtures in {GOLDEN}"
)

SMALL = dict(
    layers=2,
    model_dim=32,
    heads=4,
    max_text_tokens=20,
    max_mel_tokens=30,
    max_conditioning_inputs=2,
    mel_length_compression=4,
    number_text_tokens=50,
    start_text_token=49,
    number_mel_codes=100,
    start_mel_token=98,
    stop_mel_token=99,
)
SEED = dict(
    layers=30,
    model_dim=1024,
    heads=16,
    max_text_tokens=402,
    max_mel_tokens=604,
    max_conditioning_inputs=2,
    mel_length_compression=1024,
    number_text_tokens=256,
    number_mel_codes=8194,
    start_mel_token=8192,
    stop_mel_token=8193,
    start_text_token=255,
    train_solo_embeddings=False,
    use_mel_codes_as_input=True,
    checkpointing=True,
)


def small(seed: int = 0, **kw) -> UnifiedVoice2:
    torch.manual_seed(seed)
    model = UnifiedVoice2(**{**SMALL, **kw})
    with torch.no_grad():  # proj_out starts at zero; make every block matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def batch(b: int = 2, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(b, 2, 80, 12, generator=g)
    text = torch.randint(1, 49, (b, 9), generator=g, dtype=torch.int32)
    text_lengths = torch.tensor([9, 5][:b])
    codes = torch.randint(0, 98, (b, 12), generator=g)
    wav_lengths = torch.tensor([41, 17][:b])  # 10 and 4 whole codes of 4 samples
    return cond, text, text_lengths, codes, wav_lengths


# ----------------------------------------------------------------------------- golden
@needs_golden
def test_reproduces_tortoise_latents_forward_and_greedy_steps():
    rows = compare_tortoise()
    assert len(rows) == 19 and all(r.ok for r in rows), table(rows)


@needs_golden
def test_reproduces_dlas_forward_with_its_residual_and_conditioning_tokens():
    rows = compare_dlas()
    assert len(rows) == 7 and all(r.ok for r in rows), table(rows)


# ----------------------------------------------------------------------------- layout
def _seed_rows() -> list[tuple[str, list[int], str]]:
    rows = []
    for line in (GOLDEN / "unified_voice2_seed_keys.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, _, kind = line.split("\t")
            rows.append((key, [int(s) for s in shape.strip("[]").split(",") if s.strip()], kind))
    return rows


@needs_golden
def test_seed_size_has_tortoise_keys_shapes_and_parameter_count():
    with torch.device("meta"):
        model = UnifiedVoice2(**SEED)
    rows = _seed_rows()
    model_rows = [(k, s) for k, s, kind in rows if kind == "param"]
    assert len(model_rows) == 410 and len(rows) == 470
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == model_rows
    assert sum(p.numel() for p in model.parameters()) == 421_526_786
    # autoregressive.pth = those + 60 legacy buffers; adapt_checkpoint drops exactly them
    file_keys = {k: torch.empty(s, device="meta") for k, s, _ in rows}
    assert list(model.adapt_checkpoint(file_keys)) == [k for k, _ in model_rows]
    assert set(model.legacy_state_dict()) == set(file_keys)


def test_strict_load_still_rejects_any_other_extra_key(tmp_path):
    model = small()
    state = model.legacy_state_dict()
    torch.save(state, tmp_path / "ok.pth")
    load_module(small(seed=3), tmp_path / "ok.pth", strict=True)
    torch.save({**state, "gpt.h.0.attn.extra": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="gpt.h.0.attn.extra"):
        load_module(small(), tmp_path / "bad.pth", strict=True)


# ----------------------------------------------------------------------------- training
def test_training_sequences_follow_dlas_length_and_stop_rules():
    model = small()
    _, text, text_lengths, codes, wav_lengths = batch()
    before = codes.clone()
    text_in, text_tgt, mel_in, mel_tgt = model.training_sequences(
        text, text_lengths, codes, wav_lengths
    )
    assert torch.equal(codes, before)  # the caller's codes are not padded in place
    assert text_in.dtype == torch.long and text_in.shape == (2, 11)  # 9 + stop + start
    assert text_in[:, 0].tolist() == [49, 49] and text_tgt[:, -2:].tolist() == [[0, 0], [0, 0]]
    # m = 41 // 4 = 10 codes + stop; item 1 keeps 17 // 4 + 1 = 5 codes, then stops
    assert mel_in.shape == (2, 12)
    assert mel_in[0].tolist() == [98, *codes[0, :10].tolist(), 99]
    assert mel_in[1].tolist() == [98, *codes[1, :5].tolist()] + [99] * 6
    assert torch.equal(mel_tgt[:, :-1], mel_in[:, 1:]) and mel_tgt[:, -1].tolist() == [99, 99]


def test_forward_shapes_losses_and_conditioning_forms():
    model = small()
    cond, *rest = batch()
    loss_text, loss_mel, logits = model(cond, *rest)
    assert logits.shape == (2, 100, 12)
    assert 0 < loss_text < 10 and 0 < loss_mel < 10
    # one clip [B, 80, T] is one token; averaging N clips is one token too
    assert model(cond[:, 0], *rest)[2].shape == (2, 100, 12)
    avg = small(average_conditioning_embeddings=True)
    latent = avg.get_conditioning(cond)  # [B, D] = mean of the clips
    assert torch.allclose(avg(cond, *rest)[2], avg(latent, *rest)[2], atol=1e-5)
    with pytest.raises(ValueError, match="conditioning mels"):
        model(cond[None], *rest)


def test_too_long_sequence_is_a_clear_error():
    model = small()
    cond, text, text_lengths, codes, _ = batch()
    with pytest.raises(ValueError, match="max_mel_tokens"):
        model(cond, text, text_lengths, codes.repeat(1, 4), torch.tensor([4 * 40, 8]))


def test_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = small(checkpointing=ckpt).train()
        torch.manual_seed(5)  # the same dropout masks (checkpoint replays the RNG)
        loss_text, loss_mel, _ = model(*batch())
        (loss_text + loss_mel).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# ----------------------------------------------------------------------------- generation
@pytest.mark.parametrize("average", [False, True])
def test_cached_generation_matches_recompute_at_training_positions(average):
    model = small(average_conditioning_embeddings=average)
    cond, text, *_ = batch()
    codes, logits = model.generate(cond, text[:, :6], 7, kv_cache=True)
    codes_nc, logits_nc = model.generate(cond, text[:, :6], 7, kv_cache=False)
    assert torch.equal(codes, codes_nc) and torch.allclose(logits, logits_nc, atol=1e-5)
    # the logits of step s are the training forward's mel logits at position s
    n = codes.shape[1]
    text_in = torch.nn.functional.pad(text[:, :6].long(), (0, 1))
    text_in = torch.nn.functional.pad(text_in, (1, 0), value=49)
    mel_in = torch.cat([torch.full((2, 1), 98), codes[:, : n - 1]], dim=1)
    _, mel_logits = model.logits(model.conditioning_tokens(cond), text_in, mel_in)
    assert torch.allclose(mel_logits.transpose(1, 2), logits, atol=1e-5)


def test_sampling_is_seeded_and_the_same_with_and_without_cache():
    model = small()
    cond, text, *_ = batch()
    out = [
        model.generate(
            cond,
            text[:, :4],
            6,
            temperature=1.0,
            top_k=20,
            top_p=0.9,
            kv_cache=cache,
            generator=torch.Generator().manual_seed(7),
        )[0]
        for cache in (True, False)
    ]
    assert torch.equal(out[0], out[1]) and out[0].shape == (2, 6)


def ragged_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three items whose texts (right-padded with junk) have lengths 7, 3 and 5."""
    g = torch.Generator().manual_seed(4)
    cond = torch.randn(3, 2, 80, 12, generator=g)
    text = torch.randint(1, 49, (3, 7), generator=g)
    return cond, text, torch.tensor([7, 3, 5])


@pytest.mark.parametrize("kv_cache", [True, False])
def test_ragged_text_batch_generates_what_each_item_gets_alone(kv_cache):
    model = small()
    cond, text, lengths = ragged_batch()
    codes, logits = model.generate(cond, text, 8, kv_cache=kv_cache, text_lengths=lengths)
    assert codes.shape[0] == 3 and logits.shape[:2] == codes.shape
    for i, n in enumerate(lengths.tolist()):
        alone, alone_logits = model.generate(cond[i : i + 1], text[i : i + 1, :n], 8)
        steps = alone.shape[1]
        assert torch.equal(codes[i, :steps], alone[0])
        assert (codes[i, steps:] == 99).all()  # stopped alone earlier: stop tokens after
        assert torch.allclose(logits[i, :steps], alone_logits[0], atol=1e-5)


def test_full_text_lengths_are_the_unpadded_generation():
    model = small()
    cond, text, *_ = batch()
    plain = model.generate(cond, text, 5)
    full = model.generate(cond, text, 5, text_lengths=torch.tensor([9, 9]))
    assert all(torch.equal(a, b) for a, b in zip(plain, full))
    with pytest.raises(ValueError, match="text_lengths"):
        model.generate(cond, text, 5, text_lengths=torch.tensor([10, 9]))


def test_gpt2_all_true_key_mask_equals_the_causal_paths():
    gpt = small().gpt
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2))
    ones = torch.ones(2, 11, dtype=torch.bool)
    h, past = gpt(x[:, :4], use_cache=True)  # no cache yet: is_causal
    h_m, past_m = gpt(x[:, :4], use_cache=True, key_mask=ones[:, :4])
    assert torch.allclose(h, h_m, atol=1e-6)
    h, past = gpt(x[:, 4:6], past=past, use_cache=True)  # several tokens after a cache
    h_m, past_m = gpt(x[:, 4:6], past=past_m, use_cache=True, key_mask=ones[:, :6])
    assert torch.allclose(h, h_m, atol=1e-6)
    h, _ = gpt(x[:, 6:], past=past, use_cache=True)  # one token after a cache
    h_m, _ = gpt(x[:, 6:], past=past_m, use_cache=True, key_mask=ones[:, :7])
    assert torch.allclose(h, h_m, atol=1e-6)


@pytest.mark.parametrize("kv_cache", [True, False])
def test_an_item_that_stops_early_keeps_stop_tokens_while_the_others_go_on(kv_cache):
    model = small()
    with torch.no_grad():
        model.mel_head.bias[99] -= 1e3  # nobody stops on their own
    cond, text, lengths = ragged_batch()
    codes, logits = model.generate(cond, text, 8, kv_cache=kv_cache, text_lengths=lengths)
    assert codes.shape[1] == 8 and not (codes == 99).any()
    # raise the stop logit just past the smallest gap to the greedy choice before the last
    # step: that item stops there, every other choice stays the same
    gap = logits.max(dim=2).values - logits[..., 99]  # [B, S]
    first, step = divmod(int(gap[:, :-1].argmin()), 7)
    with torch.no_grad():
        model.mel_head.bias[99] += gap[first, step] + 1e-3
    forced, _ = model.generate(cond, text, 8, kv_cache=kv_cache, text_lengths=lengths)
    assert forced.shape == codes.shape
    assert torch.equal(forced[first, :step], codes[first, :step])
    assert (forced[first, step:] == 99).all()
    others = [i for i in range(3) if i != first]
    assert torch.equal(forced[others], codes[others])


# ----------------------------------------------------------------------------- options
def test_options_are_checked_with_clear_errors():
    with pytest.raises(ValueError, match="divisible by heads"):
        UnifiedVoice2(**{**SMALL, "heads": 5})
    with pytest.raises(ValueError, match="types 2 is not supported"):
        UnifiedVoice2(**{**SMALL, "types": 2})
    with pytest.raises(ValueError, match="stop_mel_token 100 must be < number_mel_codes"):
        UnifiedVoice2(**{**SMALL, "stop_mel_token": 100})
    problems = Problems()
    kwargs = bind_options(UnifiedVoice2, {**SEED, "layers": 0}, "networks.gpt.kwargs", problems)
    assert problems.items == [("networks.gpt.kwargs.layers", "must be >= 1, got 0")]
    assert kwargs["checkpointing"] is True  # the seed's DLAS kwarg is an option
    problems = Problems()
    bind_options(UnifiedVoice2, {"checkpointing_enabled": True}, "k", problems)
    assert "set by the trainer" in problems.items[0][1]


def test_freeze_everything_but_position_embeddings_survives_requires_grad():
    model = small(freeze_everything_but_position_embeddings=True)
    model.requires_grad_(True)  # what the trainer does with a trainable network
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["mel_pos_embedding.emb.weight", "text_pos_embedding.emb.weight"]


# ----------------------------------------------------------------------------- export
def test_export_writes_a_plain_state_dict_that_loads_strictly(tmp_path):
    model = small()
    kwargs = {**SMALL}
    src = tmp_path / "100_gpt.safetensors"
    save_network(model, src, which_model="unified_voice2", kwargs=kwargs)
    out = tmp_path / "autoregressive.pth"
    assert run_command(export_main, ["--model", str(src), "--out", str(out), "--debug"]) == 0
    state = torch.load(out, weights_only=True)
    assert list(state) == list(model.state_dict())
    fresh = UnifiedVoice2(**kwargs).eval()
    fresh.load_state_dict(state, strict=True)
    args = batch()
    for a, b in zip(model(*args), fresh(*args)):
        assert torch.equal(a, b)
    legacy = tmp_path / "legacy.pth"
    assert export_main(["--model", str(src), "--out", str(legacy), "--legacy-gpt2-buffers"]) == 0
    assert torch.load(legacy, weights_only=True)["gpt.h.1.attn.bias"].shape == (1, 1, 56, 56)
    load_module(UnifiedVoice2(**kwargs), legacy, strict=True)  # adapt_checkpoint drops them
    assert run_command(export_main, ["--model", str(src), "--out", str(tmp_path / "x.bin")]) != 0
