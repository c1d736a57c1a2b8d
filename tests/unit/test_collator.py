"""CausalLMCollator and tokenize_sft: exactly the assistant tokens (and their EOS) are labelled."""
import pytest
import torch

from common.collator import IGNORE_INDEX, CausalLMCollator, assistant_spans, encode_chat, tokenize_sft


def seg(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def expected_chat(tok, messages):
    """Build ids and mask by hand from the ChatML layout: special tokens split the text, so each
    piece between them tokenizes on its own."""
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    ids, mask = [], []
    for m in messages:
        head = [start] + seg(tok, m["role"] + "\n")
        ids += head
        mask += [0] * len(head)
        body = seg(tok, m["content"]) + [end]
        ids += body
        mask += [int(m["role"] == "assistant")] * len(body)
        nl = seg(tok, "\n")
        ids += nl
        mask += [0] * len(nl)
    return ids, mask


SINGLE = [{"role": "user", "content": "What is the capital of France?"},
          {"role": "assistant", "content": "Paris is the capital of France."}]
MULTI = [{"role": "system", "content": "Answer briefly."},
         {"role": "user", "content": "How many legs does a spider have?"},
         {"role": "assistant", "content": "Eight."},
         {"role": "user", "content": "And a bee?"},
         {"role": "assistant", "content": "Six legs."}]


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single-turn", "multi-turn"])
def test_chat_mask_is_exactly_the_assistant_turns_and_their_eos(tiny_tokenizer, messages):
    ids, mask = encode_chat(messages, tiny_tokenizer)
    want_ids, want_mask = expected_chat(tiny_tokenizer, messages)
    assert ids == want_ids
    assert mask == want_mask
    spans = assistant_spans(mask)
    assert len(spans) == sum(m["role"] == "assistant" for m in messages)
    turns = [m["content"] for m in messages if m["role"] == "assistant"]
    assert [tiny_tokenizer.decode(ids[a:b]) for a, b in spans] == [t + "<|im_end|>" for t in turns]


def test_collator_pads_to_multiple_of_8_and_labels_after_padding(tiny_tokenizer):
    feats, _ = tokenize_sft([("a:1", SINGLE, {}), ("a:2", MULTI, {})], tiny_tokenizer, max_length=512)
    pad = tiny_tokenizer.pad_token_id
    batch = CausalLMCollator(pad, pad_to_multiple_of=8)(feats)
    longest = max(len(f["input_ids"]) for f in feats)
    assert batch["input_ids"].shape == (2, -(-longest // 8) * 8)
    for row, f in enumerate(feats):
        n = len(f["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == f["input_ids"]
        assert (batch["input_ids"][row, n:] == pad).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        want = [t if m else IGNORE_INDEX for t, m in zip(f["input_ids"], f["loss_mask"])]
        assert batch["labels"][row, :n].tolist() == want
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()


def test_eos_is_learned_even_when_pad_is_eos(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    feats, _ = tokenize_sft([("a:1", SINGLE, {}), ("a:2", MULTI, {})], tiny_tokenizer, max_length=512)
    batch = CausalLMCollator(pad_token_id=eos)(feats)
    # every assistant turn ends in a labelled EOS; padding (also EOS here) is not labelled
    assert int((batch["labels"] == eos).sum()) == 1 + 2
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_plain_completion_learns_completion_and_eos(tiny_tokenizer):
    data = {"prompt": "Translate good morning into Spanish:", "completion": " Buenos dias."}
    feats, _ = tokenize_sft([("c:1", None, data)], tiny_tokenizer, max_length=512)
    ids, mask = feats[0]["input_ids"], feats[0]["loss_mask"]
    n_prompt = len(seg(tiny_tokenizer, data["prompt"]))
    assert mask == [0] * n_prompt + [1] * (len(ids) - n_prompt)
    assert ids[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(ids[n_prompt:]) == " Buenos dias.<|im_end|>"


def test_truncation_is_reported_per_turn_and_empty_examples_are_named(tiny_tokenizer):
    ids, mask = encode_chat(MULTI, tiny_tokenizer)
    (a1, b1), (a2, b2) = assistant_spans(mask)
    items = [("f.jsonl:1", MULTI, {}), ("f.jsonl:2", SINGLE, {})]
    # cut inside the second assistant turn: one partial turn, nothing dropped
    feats, rep = tokenize_sft(items[:1], tiny_tokenizer, max_length=a2 + 1)
    assert (rep.truncated_examples, rep.partial_turns, rep.dropped_turns, rep.kept) == (1, 1, 0, 1)
    # cut before the second assistant turn starts: that turn is dropped (and counted)
    feats, rep = tokenize_sft(items[:1], tiny_tokenizer, max_length=a2)
    assert (rep.partial_turns, rep.dropped_turns) == (0, 1)
    assert sum(feats[0]["loss_mask"]) == b1 - a1
    # cut before MULTI's first assistant token (it has a system turn, so SINGLE's answer starts
    # earlier): MULTI is dropped and named by file:line, SINGLE is kept
    first_single = assistant_spans(encode_chat(SINGLE, tiny_tokenizer)[1])[0][0]
    assert first_single < a1
    feats, rep = tokenize_sft(items, tiny_tokenizer, max_length=a1)
    assert rep.dropped_examples == ["f.jsonl:1"]
    assert rep.kept == 1 and feats[0]["input_ids"] == encode_chat(SINGLE, tiny_tokenizer)[0][:a1]


def test_all_examples_losing_their_labels_is_an_error(tiny_tokenizer):
    with pytest.raises(ValueError, match="no example has a labelled token within max_length=4"):
        tokenize_sft([("f.jsonl:7", SINGLE, {})], tiny_tokenizer, max_length=4)


def test_length_mismatch_between_ids_and_mask_names_the_item(tiny_tokenizer):
    collate = CausalLMCollator(tiny_tokenizer.pad_token_id)
    with pytest.raises(ValueError, match=r"batch item 1: input_ids has 3 tokens but loss_mask has 2"):
        collate([{"input_ids": [5, 6], "loss_mask": [0, 1]}, {"input_ids": [5, 6, 7], "loss_mask": [0, 1]}])


def test_batch_without_labels_is_an_error(tiny_tokenizer):
    collate = CausalLMCollator(tiny_tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="no labelled token"):
        collate([{"input_ids": [5, 6, 7], "loss_mask": [0, 0, 0]}])


def test_template_without_generation_markers_is_refused(tiny_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer.name_or_path)
    tok.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    with pytest.raises(ValueError, match=r"f.jsonl:3: no assistant token is marked.*generation"):
        tokenize_sft([("f.jsonl:3", SINGLE, {})], tok, max_length=512)


def test_collator_output_is_a_valid_causal_lm_batch(tiny_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    feats, _ = tokenize_sft([("a:1", SINGLE, {}), ("a:2", MULTI, {})], tiny_tokenizer, max_length=512)
    batch = CausalLMCollator(tiny_tokenizer.pad_token_id)(feats)
    loss = model(**batch).loss
    # the model's loss equals cross-entropy over exactly the labelled (shifted) positions
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert torch.allclose(loss, manual, atol=1e-5)


def test_padding_free_batch_labels_the_same_tokens_as_the_padded_one(tiny_tokenizer):
    """One row, no padding, so pad == EOS cannot hide an EOS; the labelled tokens are the padded batch's."""
    from common.collator import PaddingFreeCollator

    feats, _ = tokenize_sft([("a:1", SINGLE, {}), ("a:2", MULTI, {})], tiny_tokenizer, max_length=512)
    packed = PaddingFreeCollator()(feats)
    padded = CausalLMCollator(pad_token_id=tiny_tokenizer.eos_token_id)(feats)
    assert "attention_mask" not in packed and packed["input_ids"].shape == (1, sum(len(f["input_ids"]) for f in feats))
    assert int((packed["labels"] == tiny_tokenizer.eos_token_id).sum()) == 1 + 2
    assert sorted(packed["labels"][packed["labels"] != IGNORE_INDEX].tolist()) == \
        sorted(padded["labels"][padded["labels"] != IGNORE_INDEX].tolist())
