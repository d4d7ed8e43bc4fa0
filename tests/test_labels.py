"""Label masks: hand-checked per template, identical to the original's preprocess_v1/plain where
its token-count corrections hold, and correct where they do not ("tokenization mismatch")."""

from __future__ import annotations

import io
import random

import pytest

from llava.processing.labels import IGNORE_INDEX, LabelError, build_example
from llava.processing.templates import get_template
from llava.processing.tokenize import tokenize_prompt

IMAGE = -200  # the original's placeholder id
UNI = "Ünïcödé ✓ 日本"

SINGLE = ["<image>\nWhat is shown?", "A red circle."]
MULTI = ["<image>\nWhat color is the circle?", "Red.", "How many circles?", "There are two circles.",
         "Is there a star?", "No."]
TEXT = ["Say hi.", "Hi!"]
UNICODE = [f"<image>\n{UNI}?", UNI]
CASES = {"single": (SINGLE, [3]), "multi": (MULTI, [3]), "text": (TEXT, []), "unicode": (UNICODE, [2])}

# What each template trains: exactly the text a model generates after the inference prompt
# (which ends at "ASSISTANT:", "[/INST]" or "<|im_start|>assistant\n"), one string per answer.
ANSWERS = {"single": ["A red circle."], "multi": ["Red.", "There are two circles.", "No."], "text": ["Hi!"],
           "unicode": [UNI]}
FORMS = {
    "vicuna_v1": " {}</s>",
    "llava_v1": " {}</s>",
    "llava_llama_2": " {} </s>",
    "mistral_instruct": " {} </s>",
    "chatml_direct": "{}<|im_end|>",
}
EXPECTED = {(name, case): [form.format(a) for a in answers] for name, form in FORMS.items()
            for case, answers in ANSWERS.items()}
# plain (stage 1): "<image>" + caption + "\n"; the human text is dropped, only the caption is trained.
EXPECTED.update({("plain", "single"): ["A red circle.\n"], ("plain", "text"): ["Hi!\n"],
                 ("plain", "unicode"): [UNI + "\n"]})


def trained_runs(tok, ids, labels) -> list[str]:
    """Decode each maximal run of trained positions."""
    runs, cur = [], []
    for t, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


@pytest.fixture(scope="module")
def image_id(tiny_tok):
    return tiny_tok.convert_tokens_to_ids("<image>")


# -- (a) hand-checked masks with the tiny byte-level BPE tokenizer ------------------------------


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", ["plain", *FORMS])
@pytest.mark.parametrize("convention", ["original", "hf"])
def test_expected_masks_per_template(tiny_tok, image_id, name, case, convention):
    turns, counts = CASES[case]
    if (name, case) == ("plain", "multi"):
        with pytest.raises(LabelError, match="plain template .* one human and one gpt turn"):
            build_example(tiny_tok, name, turns, counts, image_id, convention)
        return
    ids, labels = build_example(tiny_tok, name, turns, counts, image_id, convention)
    assert trained_runs(tiny_tok, ids, labels) == EXPECTED[name, case]
    assert ids[0] == tiny_tok.bos_token_id and labels[0] == IGNORE_INDEX
    assert ids.count(image_id) == sum(counts)
    assert all(label == IGNORE_INDEX for t, label in zip(ids, labels) if t == image_id)
    if name != "plain":  # the ids are exactly the inference tokenisation of the rendered chat
        text = get_template(name).render(turns)
        assert ids == tokenize_prompt(tiny_tok, text, counts, image_id, convention)


def test_plain_is_the_original_stage1_string(tiny_tok, image_id):
    ids, labels = build_example(tiny_tok, "plain", ["Describe it.\n<image>", "A red circle."], [2], image_id)
    # "<image>" + caption + "\n": BOS, 2 placeholders, then the caption tokens, all trained.
    assert ids[:3] == [tiny_tok.bos_token_id, image_id, image_id]
    assert labels[:3] == [IGNORE_INDEX] * 3 and IGNORE_INDEX not in labels[3:]
    assert tiny_tok.decode(ids[3:]) == "A red circle.\n"


def test_truncation_keeps_the_head_and_never_cuts_images(tiny_tok, image_id):
    ids, labels = build_example(tiny_tok, "vicuna_v1", MULTI, [3], image_id)
    short_ids, short_labels = build_example(tiny_tok, "vicuna_v1", MULTI, [3], image_id, max_length=len(ids) - 4)
    assert short_ids == ids[:len(ids) - 4] and short_labels == labels[:len(ids) - 4]
    start = ids.index(image_id)
    with pytest.raises(LabelError, match=rf"row r7: .*max_length={start + 1} would cut image 1 of 1"):
        build_example(tiny_tok, "vicuna_v1", MULTI, [3], image_id, max_length=start + 1, row_id="r7")
    first_answer = labels.index(next(label for label in labels if label != IGNORE_INDEX))
    with pytest.raises(LabelError, match="leaves no answer tokens"):
        build_example(tiny_tok, "vicuna_v1", MULTI, [3], image_id, max_length=first_answer, row_id="r7")
    two = ["<image>\nA?", "Yes.", "<image>\nB?", "No."]
    ids2, _ = build_example(tiny_tok, "vicuna_v1", two, [2, 2], image_id)
    second = [i for i, t in enumerate(ids2) if t == image_id][2]
    with pytest.raises(LabelError, match="would drop image 2 of 2"):
        build_example(tiny_tok, "vicuna_v1", two, [2, 2], image_id, max_length=second)


@pytest.mark.parametrize("turns,counts,match", [
    (["Q?", ""], [], "turn 1 \\(gpt\\) is empty"),
    (["Q?", "see <image>"], [1], "turn 1 \\(gpt\\) contains <image>"),
    (["Q?", "A.", "Q2?"], [], "ends with a human turn"),
    (["<image>\nQ?", "A."], [1, 1], "1 <image> tag\\(s\\) but 2 image"),
    ([], [], "no turns"),
])
def test_bad_rows_raise_with_row_id(tiny_tok, image_id, turns, counts, match):
    with pytest.raises(LabelError, match="row x1: .*" + match) as info:
        build_example(tiny_tok, "vicuna_v1", turns, counts, image_id, row_id="x1")
    assert info.value.row_id == "x1"


def test_offsetless_fallback_gives_the_same_masks(tiny_tok, image_id, monkeypatch):
    """Tokenizers without offsets (not `is_fast`) locate answers by tokenising prefixes."""
    expected = {(n, c): build_example(tiny_tok, n, *CASES[c], image_id) for n in FORMS for c in CASES}
    monkeypatch.setattr(type(tiny_tok), "is_fast", property(lambda self: False))
    for (name, case), want in expected.items():
        assert build_example(tiny_tok, name, *CASES[case], image_id) == want


# -- (b) the original's algorithm, re-implemented from its description, on a Llama-style tokenizer


def original_tokenizer_image_token(tok, prompt: str) -> list[int]:
    """Each chunk around <image> tokenised alone; BOS kept once; one -200 per image (facts 1.6)."""
    chunks = [tok(c).input_ids for c in prompt.split("<image>")]
    keep_bos = bool(chunks[0]) and chunks[0][0] == tok.bos_token_id
    ids = [tok.bos_token_id] if keep_bos else []
    for k, chunk in enumerate(chunks):
        if k:
            ids.append(IMAGE)
        ids += chunk[1:] if keep_bos else chunk
    return ids


def original_preprocess(tok, conversation: str, has_image: bool, sep: str, minus_one: bool, max_len: int = 2048):
    """preprocess_v1 (sep " ASSISTANT: ", -1 rule for non-legacy tokenizers) and preprocess_llama_2
    (sep "[/INST] ", no -1 rule), facts 5.2: count tokens of re-tokenised rounds with corrections."""
    def n_tokens(text: str) -> int:
        return len(original_tokenizer_image_token(tok, text) if has_image else tok(text).input_ids)

    ids = original_tokenizer_image_token(tok, conversation) if has_image else tok(conversation).input_ids
    labels = list(ids)
    total_len = sum(t != tok.pad_token_id for t in ids)
    cur_len = 1
    labels[:cur_len] = [IGNORE_INDEX]
    for i, rou in enumerate(conversation.split("</s>")):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len, instruction_len = n_tokens(rou), n_tokens(parts[0]) - 2
        if i != 0 and minus_one:  # v1: "tokenizers >= 0.14 and a non-legacy tokenizer"
            round_len -= 1
            instruction_len -= 1
        end = min(cur_len + instruction_len, len(labels))
        labels[cur_len:end] = [IGNORE_INDEX] * (end - cur_len)
        cur_len += round_len
    labels[cur_len:] = [IGNORE_INDEX] * max(0, len(labels) - cur_len)
    mismatch = cur_len < max_len and cur_len != total_len
    if mismatch:  # "WARNING: tokenization mismatch ... (ignored)": the whole row is masked
        labels = [IGNORE_INDEX] * len(labels)
    return ids, labels, mismatch


def original_preprocess_v1(tok, conversation: str, has_image: bool, legacy: bool):
    return original_preprocess(tok, conversation, has_image, " ASSISTANT: ", minus_one=not legacy)


def original_preprocess_plain(tok, caption: str) -> tuple[list[int], list[int]]:
    ids = original_tokenizer_image_token(tok, "<image>" + caption + "\n")
    n_prompt = len(original_tokenizer_image_token(tok, "<image>"))
    return ids, [IGNORE_INDEX] * n_prompt + ids[n_prompt:]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    """A small Llama-style SentencePiece BPE model (<unk>=0, <s>=1, </s>=2, byte fallback,
    no normalisation), trained here in well under a second."""
    spm = pytest.importorskip("sentencepiece")
    rng = random.Random(0)
    words = ("the a red blue green circle square what is shown in image there are two three answer question "
             "describe picture color shape left right top bottom yes no").split()
    system = get_template("vicuna_v1").system
    lines = [f"{system} USER: {' '.join(rng.choices(words, k=rng.randint(3, 9))).capitalize()}? ASSISTANT: "
             f"{' '.join(rng.choices(words, k=rng.randint(2, 12))).capitalize()}." for _ in range(300)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=400, model_type="bpe",
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
                                   character_coverage=1.0, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, minloglevel=2)  # as Llama's model
    folder = tmp_path_factory.mktemp("sp-llama")
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    return str(folder)


def llama_tokenizer(folder: str, legacy: bool):
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(folder, legacy=legacy, add_bos_token=True)
    tok.pad_token = tok.unk_token  # as the original's training script sets it
    return tok


CONVERSATIONS = [
    SINGLE, MULTI, TEXT, UNICODE,
    ["<image>\nQ", "\nAn answer that starts with a new line."],
    ["<image>\nHow many?", "42 of them."],
    ["Describe the picture.", "Left: a square\nRight: a circle.", "And the top?", "(nothing)"],
    ["<image>\nIs the ASSISTANT visible?", "No, only the USER."],
    ["What is red?", "The circle.", "<image>\nAnd here?", "The square.", "Sure?", "Yes.", "Really?", "Yes!"],
    ["<image>\n" + UNI, "日本 ✓", "Again: " + UNI, "✓✓"],
    ["Q:  two  spaces?", "  Leading spaces and trailing ones  "],
    ["<image>", "Only an image was asked about."],
]


def test_fast_llama_tokenizer_is_the_sentencepiece_model(sp_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sp_model + "/tokenizer.model")
    tok = llama_tokenizer(sp_model, legacy=True)
    for text in ("A chat between USER: What? ASSISTANT: Red.", UNI + " ok", "\nnew line"):
        assert tok(text).input_ids == [1] + sp.encode(text)


@pytest.mark.parametrize("k", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("name,sep", [("vicuna_v1", " ASSISTANT: "), ("llava_llama_2", "[/INST] "),
                                      ("mistral_instruct", "[/INST] ")])
def test_identical_to_original_preprocess(sp_model, k, name, sep):
    """Legacy Llama tokenisation (a '▁' after every special token): the original's counts are
    right, and our masks are the same token for token (preprocess_v1 and preprocess_llama_2)."""
    tok = llama_tokenizer(sp_model, legacy=True)
    turns = CONVERSATIONS[k]
    n_images = sum(t.count("<image>") for t in turns)
    text = get_template(name).render(turns)
    ref_ids, ref_labels, mismatch = original_preprocess(tok, text, n_images > 0, sep, minus_one=False)
    ids, labels = build_example(tok, name, turns, [1] * n_images, IMAGE)
    assert not mismatch
    assert ids == ref_ids
    assert labels == ref_labels


@pytest.mark.parametrize("caption", ["A red circle.", UNI, "\nstarts with a new line", "42"])
def test_identical_to_original_preprocess_plain(sp_model, caption):
    tok = llama_tokenizer(sp_model, legacy=True)
    assert build_example(tok, "plain", ["<image>\nignored", caption], [1], IMAGE) == \
        original_preprocess_plain(tok, caption)


@pytest.mark.parametrize("name,sep,minus_one,end", [("vicuna_v1", " ASSISTANT: ", True, "</s>"),
                                                    ("mistral_instruct", "[/INST] ", False, " </s>")])
def test_original_mismatch_with_non_legacy_tokenizer_ours_is_right(sp_model, name, sep, minus_one, end):
    """The famous "tokenization mismatch": without the legacy '▁' after "</s>", "USER" of a later
    round takes 2 tokens here ("US", "ER") against 1 ("▁USER") when the round is tokenised alone
    (likewise "[INST]").  preprocess_v1's fixed -1 correction assumes the opposite (Llama's own
    vocabulary) and preprocess_llama_2 has none, so cur_len drifts and every label of a
    multi-round row is masked.  Ours follow the character offsets and stay right."""
    tok = llama_tokenizer(sp_model, legacy=False)
    for turns in CONVERSATIONS:
        n_images = sum(t.count("<image>") for t in turns)
        text = get_template(name).render(turns)
        _, ref_labels, mismatch = original_preprocess(tok, text, n_images > 0, sep, minus_one)
        ids, labels = build_example(tok, name, turns, [1] * n_images, IMAGE)
        # (this decoder drops the leading space of a decoded run, so runs read as the answers)
        assert trained_runs(tok, ids, labels) == [answer + end for answer in turns[1::2]]
        assert mismatch == (len(turns) > 2)  # multi-round rows: the original trains on nothing
        if mismatch:
            assert set(ref_labels) == {IGNORE_INDEX}


# -- (c) where the original algorithm mis-masks the tiny BPE tokenizer ----------------------------


def test_tiny_bpe_multi_round_original_masks_everything(tiny_tok):
    """A non-Llama tokenizer has no `legacy` flag; taken as non-legacy (the -1 rule) the original
    masks every multi-round row.  Only with the correction switched off does it agree with ours."""
    text = get_template("vicuna_v1").render(MULTI)
    ids, labels = build_example(tiny_tok, "vicuna_v1", MULTI, [1], IMAGE)
    ref_ids, ref_labels, mismatch = original_preprocess_v1(tiny_tok, text, True, legacy=False)
    assert ref_ids == ids and mismatch and set(ref_labels) == {IGNORE_INDEX}
    assert trained_runs(tiny_tok, ids, labels) == [" Red.</s>", " There are two circles.</s>", " No.</s>"]
    assert original_preprocess_v1(tiny_tok, text, True, legacy=True)[1] == labels


def test_tiny_bpe_separator_inside_an_answer(tiny_tok):
    """An answer quoting " ASSISTANT: " splits the original's round into 3 parts: it stops and the
    row is masked whatever the tokenizer.  Our spans come from the template, not from re-parsing."""
    turns = ["Quote a chat.", "USER: hi ASSISTANT: hello", "And a </s>?", "It is the end token."]
    text = get_template("vicuna_v1").render(turns)
    _, ref_labels, mismatch = original_preprocess_v1(tiny_tok, text, False, legacy=True)
    assert mismatch and set(ref_labels) == {IGNORE_INDEX}
    ids, labels = build_example(tiny_tok, "vicuna_v1", turns, [], IMAGE)
    assert trained_runs(tiny_tok, ids, labels) == [" USER: hi ASSISTANT: hello</s>", " It is the end token.</s>"]
