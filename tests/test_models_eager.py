"""fuselm's eager model definitions against Hugging Face transformers, random weights.

Decoders run several prompts packed into one call of the LM contract and must match HF
run on each prompt alone; the paged-attention reference must match dense causal
attention at a scrambled block layout with cached context.
"""
import pytest
import torch
import torch.nn.functional as F
import transformers

from fuselm.models import bert, gpt2, llama
from fuselm.models.attention import kv_cache_write_reference, paged_attention_reference
from fuselm.models.config import BertConfig, GPT2Config, LlamaConfig
from fuselm.models.contract import pack_prompts, prompt_logits

VOCAB = 97
TOLERANCE = 1e-4


def perturb_(model: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Add noise to every parameter so norms, biases and attention patterns are not trivial."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * scale)
    return model.eval()


def random_prompts(lengths: list[int]) -> list[list[int]]:
    return [torch.randint(0, VOCAB, (n,)).tolist() for n in lengths]


def hf_prompt_logits(hf_model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([prompt])).logits[0]


def assert_matches_hf(model, config, hf_model, lengths: list[int]) -> None:
    prompts = random_prompts(lengths)
    ours = prompt_logits(model, config, prompts, all_logits=True)
    for prompt, logits in zip(prompts, ours):
        expected = hf_prompt_logits(hf_model, prompt)
        assert logits.shape == expected.shape
        assert (logits - expected).abs().max() < TOLERANCE
    last_only = prompt_logits(model, config, prompts, all_logits=False)
    for logits, all_rows in zip(last_only, ours):
        assert (logits - all_rows[-1]).abs().max() < TOLERANCE


@pytest.mark.parametrize("tie_word_embeddings", [True, False])
def test_llama_matches_hf_with_gqa(tie_word_embeddings):
    torch.manual_seed(0)
    fields = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        rope_theta=500.0, tie_word_embeddings=tie_word_embeddings,
    )
    hf_model = perturb_(transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)))
    config = LlamaConfig(**fields)
    model = llama.LlamaForCausalLM(config)
    model.load_state_dict(llama.hf_to_fuselm_state_dict(hf_model.state_dict()))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie_word_embeddings
    assert_matches_hf(model, config, hf_model, [5, 19, 1])
    assert_matches_hf(model, config, hf_model, [33, 2])


def test_llama_rope_frequencies_stay_fp32_in_bf16():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4)
    model = llama.LlamaForCausalLM(config)
    fp32_freqs = model.model.rotary_emb.inv_freq.clone()
    model.to(torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(model.model.rotary_emb.inv_freq, fp32_freqs)
    assert "model.rotary_emb.inv_freq" in dict(model.named_buffers())


def test_llama_state_dict_conversion_fills_tied_head():
    torch.manual_seed(0)
    embedding = torch.randn(VOCAB, 8)
    converted = llama.hf_to_fuselm_state_dict(
        {"model.embed_tokens.weight": embedding, "model.rotary_emb.inv_freq": torch.ones(2)}
    )
    assert set(converted) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert converted["lm_head.weight"] is embedding


def test_gpt2_matches_hf():
    torch.manual_seed(0)
    fields = dict(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0,
    )
    hf_model = perturb_(transformers.GPT2LMHeadModel(transformers.GPT2Config(**fields)))
    config = GPT2Config(**fields)
    model = gpt2.GPT2LMHeadModel(config)
    model.load_state_dict(gpt2.hf_to_fuselm_state_dict(hf_model.state_dict()))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert_matches_hf(model, config, hf_model, [5, 19, 1])
    assert_matches_hf(model, config, hf_model, [40, 7])


def test_gpt2_state_dict_conversion_accepts_unprefixed_checkpoints():
    torch.manual_seed(0)
    conv1d = torch.randn(8, 24)
    checkpoint = {"wte.weight": torch.randn(VOCAB, 8), "h.0.attn.c_attn.weight": conv1d,
                  "h.0.attn.c_attn.bias": torch.randn(24), "h.0.attn.bias": torch.ones(1)}
    converted = gpt2.hf_to_fuselm_state_dict(checkpoint)
    assert set(converted) == {
        "transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
        "lm_head.weight",
    }
    assert torch.equal(converted["transformer.h.0.attn.c_attn.weight"], conv1d.t())


def tiny_bert():
    fields = dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, max_position_embeddings=32,
    )
    hf_model = perturb_(transformers.BertModel(transformers.BertConfig(**fields)))
    model = bert.BertModel(BertConfig(**fields))
    prefixed = {"bert." + k: v for k, v in hf_model.state_dict().items()}
    model.load_state_dict(bert.hf_to_fuselm_state_dict(prefixed))
    return model.eval(), hf_model


def padded_batch(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths)
    input_ids = torch.randint(1, VOCAB, (len(lengths), width))
    attention_mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return input_ids * attention_mask, attention_mask


def test_bert_matches_hf_on_real_tokens():
    torch.manual_seed(0)
    model, hf_model = tiny_bert()
    lengths = [7, 3, 12]
    input_ids, attention_mask = padded_batch(lengths)
    with torch.no_grad():
        ours = model(input_ids, attention_mask)
        expected = hf_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    assert ours.shape == expected.shape
    for row, n in enumerate(lengths):
        assert (ours[row, :n] - expected[row, :n]).abs().max() < TOLERANCE


def test_sentence_embeddings_mean_pool_real_tokens():
    torch.manual_seed(0)
    model, hf_model = tiny_bert()
    lengths = [7, 3, 12]
    input_ids, attention_mask = padded_batch(lengths)
    with torch.no_grad():
        embeddings = bert.sentence_embeddings(model(input_ids, attention_mask), attention_mask)
        hf_hidden = hf_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    means = [hf_hidden[row, :n].mean(0) for row, n in enumerate(lengths)]
    expected = torch.stack([mean / mean.norm() for mean in means])
    assert (embeddings - expected).abs().max() < TOLERANCE
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(len(lengths)))


def dense_causal_attention(query, keys, values, scale):
    """Last `len(query)` positions of a context, attending causally, via SDPA with GQA."""
    q_len, context_len = query.shape[0], keys.shape[0]
    visible = torch.ones(q_len, context_len, dtype=torch.bool).tril(context_len - q_len)
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
        attn_mask=visible, scale=scale, enable_gqa=True,
    )
    return out.transpose(0, 1)


def scrambled_layout(context_lens, block_size, num_layers=2):
    """A cache whose sequences own shuffled blocks; returns (cache, block_tables, slots per seq)."""
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    block_ids = torch.randperm(sum(blocks_per_seq) + 3)  # a few blocks stay unused
    block_tables = torch.zeros(len(context_lens), max(blocks_per_seq), dtype=torch.int32)
    slots, used = [], 0
    for seq, (n, count) in enumerate(zip(context_lens, blocks_per_seq)):
        block_tables[seq, :count] = block_ids[used : used + count]
        used += count
        positions = torch.arange(n)
        blocks = block_tables[seq, positions // block_size].long()
        slots.append(blocks * block_size + positions % block_size)
    cache = torch.zeros(num_layers, 2, len(block_ids), block_size, 2, 8)
    return cache, block_tables, slots


@pytest.mark.parametrize("block_size", [1, 4])
def test_paged_attention_reference_matches_dense_with_cached_context(block_size):
    torch.manual_seed(0)
    context_lens, q_lens = [9, 6, 13], [9, 1, 4]  # a prefill, a decode step, a chunk
    num_heads, kv_heads, head_dim, layer, scale = 4, 2, 8, 1, 0.3
    cache, block_tables, slots = scrambled_layout(context_lens, block_size)
    keys = [torch.randn(n, kv_heads, head_dim) for n in context_lens]
    values = [torch.randn(n, kv_heads, head_dim) for n in context_lens]
    for k, v, s in zip(keys, values, slots):
        kv_cache_write_reference(cache, k, v, s, layer)
    queries = [torch.randn(q, num_heads, head_dim) for q in q_lens]
    cu_seqlens_q = F.pad(torch.tensor(q_lens).cumsum(0), (1, 0)).to(torch.int32)
    out = paged_attention_reference(
        torch.cat(queries), cache, block_tables, torch.tensor(context_lens, dtype=torch.int32),
        cu_seqlens_q, layer, scale,
    )
    expected = torch.cat(
        [dense_causal_attention(q, k, v, scale) for q, k, v in zip(queries, keys, values)]
    )
    assert (out - expected).abs().max() < 1e-5


def test_custom_ops_match_references():
    torch.manual_seed(0)
    cache, block_tables, slots = scrambled_layout([5, 3], block_size=2)
    key, value = torch.randn(8, 2, 8), torch.randn(8, 2, 8)
    slot_mapping = torch.cat(slots)
    torch.ops.fuselm.kv_cache_write(cache, key, value, slot_mapping, 0)
    expected_cache = kv_cache_write_reference(torch.zeros_like(cache), key, value, slot_mapping, 0)
    assert torch.equal(cache, expected_cache)
    query = torch.randn(8, 4, 8)
    args = (query, cache, block_tables, torch.tensor([5, 3], dtype=torch.int32),
            torch.tensor([0, 5, 8], dtype=torch.int32), 0, 0.5)
    assert torch.equal(torch.ops.fuselm.paged_attention(*args), paged_attention_reference(*args))


def test_kv_cache_write_puts_keys_at_their_slots_and_skips_padding():
    torch.manual_seed(0)
    cache = torch.zeros(2, 2, 4, 4, 2, 8)  # [L, 2, NB, BS, Hkv, D]
    key, value = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    slot_mapping = torch.tensor([13, -1, 2])  # block 3 offset 1; padding; block 0 offset 2
    returned = kv_cache_write_reference(cache, key, value, slot_mapping, layer=1)
    assert returned is cache
    assert torch.equal(cache[1, 0, 3, 1], key[0]) and torch.equal(cache[1, 1, 3, 1], value[0])
    assert torch.equal(cache[1, 0, 0, 2], key[2]) and torch.equal(cache[1, 1, 0, 2], value[2])
    written_rows = cache.flatten(0, 3).abs().sum(dim=(1, 2)) != 0
    assert int(written_rows.sum()) == 4  # 2 tokens x (key, value); padding, layer 0 untouched


def test_pack_prompts_layout():
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    inputs = pack_prompts(config, [[1] * 5, [2] * 9, [3]], block_size=4)
    assert inputs.kv_cache.shape == (1, 2, 6, 4, 2, 8)
    assert inputs.block_tables.tolist() == [[0, 1, 0], [2, 3, 4], [5, 0, 0]]
    assert inputs.slot_mapping.tolist() == [0, 1, 2, 3, 4] + list(range(8, 17)) + [20]
    assert inputs.positions.tolist() == list(range(5)) + list(range(9)) + [0]
    assert inputs.cu_seqlens_q.tolist() == [0, 5, 14, 15]
    assert inputs.context_lens.tolist() == [5, 9, 1]
    assert inputs.logits_indices.tolist() == [4, 13, 14]
    i32, i64 = torch.int32, torch.int64
    assert [t.dtype for t in inputs.as_tuple()] == [i64, i64, torch.float32, i64, i32, i32, i32, i64]
