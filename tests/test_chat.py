"""Chat templates (jaxdec.chat) against transformers' apply_chat_template, and `--chat`."""

import dataclasses
import io
import json
import os
import re
import shutil

import pytest
import transformers

import jaxdec
from jaxdec.chat import ChatTemplate, ChatTemplateError, encode_chat, load_chat_template
from jaxdec.cli import main
from hf_models import make_tokenizer

# Templates in the styles instruct checkpoints ship (written for these tests).
HEADERS = (  # Llama 3's layout: BOS, header markers, an optional dated system turn
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] | trim %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = 'today is ' + strftime_now('%Y') %}{% endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\n{{ system }}<|eot_id|>\n"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHATML = (  # Qwen's layout: a default system turn, tools as JSON
    "{% if tools %}<|im_start|>system\nTools:{% for tool in tools %}\n{{ tool | tojson }}"
    "{% endfor %}<|im_end|>\n{% elif messages[0].role != 'system' %}"
    "<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = {"bos_token": "<s>", "pad_token": "<pad>",  # older files write AddedToken dicts
           "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False,
                         "normalized": False, "rstrip": False, "single_word": False}}
CONVERSATIONS = [
    [{"role": "user", "content": "hello the quick fox"}],
    [{"role": "system", "content": "  be brief  "}, {"role": "user", "content": "héllo ünï"},
     {"role": "assistant", "content": "the lazy dog"}, {"role": "user", "content": "again?"}],
]


def _directory(tmp_path, template=None, jinja=None, name="tok"):
    directory = tmp_path / name
    directory.mkdir()
    make_tokenizer().save(str(directory / "tokenizer.json"))
    config = dict(SPECIAL, tokenizer_class="PreTrainedTokenizerFast")
    if template is not None:
        config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (directory / "chat_template.jinja").write_text(jinja)
    return directory


class _Model:  # what encode_chat reads of a Model
    def __init__(self, directory):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.chat_template = load_chat_template(directory)


@pytest.mark.parametrize("template", [HEADERS, CHATML], ids=["headers", "chatml"])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_rendered_and_encoded_as_transformers_does(tmp_path, template, conversation,
                                                   generation_prompt):
    directory = _directory(tmp_path, template)
    messages = CONVERSATIONS[conversation]
    theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
    text = load_chat_template(directory).render(messages,
                                                add_generation_prompt=generation_prompt)
    assert text == theirs.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=generation_prompt)
    ids = encode_chat(_Model(directory), messages, add_generation_prompt=generation_prompt)
    want = theirs.apply_chat_template(messages, tokenize=True,
                                      add_generation_prompt=generation_prompt)
    assert ids == list(getattr(want, "input_ids", want))
    assert ids.count(1) == (template == HEADERS)  # BOS (id 1) once: the template's


def test_generation_blocks_render_their_body(tmp_path):
    """transformers' {% generation %} tag (assistant masks for training) compiles and renders
    its body, as there."""
    template = CHATML.replace("{{ m.content }}", "{% if m.role == 'assistant' %}"
                              "{% generation %}{{ m.content }}{% endgeneration %}"
                              "{% else %}{{ m.content }}{% endif %}")
    directory = _directory(tmp_path, template)
    theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
    text = load_chat_template(directory).render(CONVERSATIONS[1])
    assert "the lazy dog" in text
    assert text == theirs.apply_chat_template(CONVERSATIONS[1], tokenize=False,
                                              add_generation_prompt=True)


def test_tools_reach_the_template_as_json(tmp_path):
    directory = _directory(tmp_path, CHATML)
    tools = [{"name": "lookup", "description": "finds ünïcode"}]
    text = load_chat_template(directory).render(CONVERSATIONS[0], tools=tools)
    assert '{"name": "lookup", "description": "finds ünïcode"}' in text
    theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert text == theirs.apply_chat_template(CONVERSATIONS[0], tools=tools, tokenize=False,
                                              add_generation_prompt=True)


def test_tools_and_documents_are_none_unless_given(tmp_path):
    """As transformers passes them: a template testing `tools is not none` (Mistral's style)
    renders no tools block for a plain conversation; `tojson` takes ensure_ascii; the special
    tokens of special_tokens_map.json (older checkpoints name some there only) reach the
    template, before tokenizer_config.json's."""
    template = ("{{ bos_token }}{% for m in messages %}{% if tools is not none and loop.last %}"
                "[TOOLS]{{ tools | tojson(ensure_ascii=True) }}[/TOOLS]{% endif %}"
                "{% if documents is not none %}[DOCS]{% endif %}[INST] {{ m.content }}[/INST]"
                "{% endfor %}{{ eos_token }}")
    directory = _directory(tmp_path, template)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    del config["bos_token"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>",
                                                                   "eos_token": "<other>"}))
    ours = load_chat_template(directory)
    theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
    tools = [{"name": "lookup", "description": "finds ünïcode"}]
    for extra in ({}, {"tools": tools}):
        text = ours.render(CONVERSATIONS[0], add_generation_prompt=False, **extra)
        assert text == theirs.apply_chat_template(CONVERSATIONS[0], tokenize=False,
                                                  add_generation_prompt=False, **extra)
    assert text.startswith("<s>[TOOLS]") and "\\u00fc" in text and text.endswith("<other>")
    assert ours.render(CONVERSATIONS[0]) == "<s>[INST] hello the quick fox[/INST]<other>"
    # A token the map sets to null has none (tokenizer_config.json's is not taken).
    config["bos_token"] = "<s>"
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "special_tokens_map.json").write_text(json.dumps({"bos_token": None}))
    theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert load_chat_template(directory).render(CONVERSATIONS[0]) == \
        theirs.apply_chat_template(CONVERSATIONS[0], tokenize=False) == \
        "[INST] hello the quick fox[/INST]</s>"


def test_reasoning_reaches_the_template_under_each_name(tmp_path):
    """A message's reasoning given as `reasoning` (or `thinking`) reaches a template reading
    `reasoning_content` (or gpt-oss's `thinking`), as transformers passes it."""
    template = ("{% for m in messages %}{% if m.reasoning_content %}<think>"
                "{{ m.reasoning_content }}</think>{% endif %}{% if m.thinking %}[{{ m.thinking }}]"
                "{% endif %}{{ m.content }}\n{% endfor %}")
    directory = _directory(tmp_path, template)
    theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
    for name in ("reasoning", "thinking", "reasoning_content"):
        conversation = [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a", name: "hmm"}]
        text = load_chat_template(directory).render(conversation, add_generation_prompt=False)
        assert text == "q\n<think>hmm</think>[hmm]a\n" == theirs.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=False)


@pytest.mark.parametrize("template", [HEADERS, CHATML], ids=["headers", "chatml"])
@pytest.mark.parametrize("reply", ["the lazy", "the lazy ", [{"type": "text", "text": "the "},
                                                             {"type": "text", "text": "lazy"}]])
def test_a_final_message_continued_as_transformers_does(tmp_path, template, reply):
    """`continue_final_message` leaves the last message open (the start of a reply, for the
    model to go on from): it closed the turn, and opened another (jaxdec's default
    add_generation_prompt; transformers refuses the pair). A template that trims the message
    (HEADERS) drops its trailing space; one that writes it as given keeps it. Content blocks
    (the last text block continued), a reasoning field by name, and the refusals too."""
    directory = _directory(tmp_path, template.replace("{{ m.content }}", "{% if m.content is "
                           "string %}{{ m.content }}{% else %}{% for b in m.content %}"
                           "{{ b.text }}{% endfor %}{% endif %}"))
    messages = CONVERSATIONS[0] + [{"role": "assistant", "content": reply}]
    if template == HEADERS and not isinstance(reply, str):
        return  # (its trim filter takes strings only)
    theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
    want = theirs.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    ours = load_chat_template(directory)
    assert ours.render(messages, continue_final_message=True) == want
    assert want.endswith("lazy" if template == HEADERS else "".join(
        [reply] if isinstance(reply, str) else [b["text"] for b in reply]))
    ids = encode_chat(_Model(directory), messages, continue_final_message=True)
    assert ids == list(getattr(ids_ := theirs.apply_chat_template(
        messages, tokenize=True, continue_final_message=True), "input_ids", ids_))
    assert messages[-1]["content"] == reply  # the caller's messages untouched
    with pytest.raises(ValueError, match="add_generation_prompt and continue_final_message "
                                         "exclude each other"):
        ours.render(messages, continue_final_message=True, add_generation_prompt=True)
    with pytest.raises(TypeError, match="continue_final_message must be a bool"):
        ours.render(messages, continue_final_message=1)


def test_a_final_messages_field_continued_by_name(tmp_path):
    template = ("{% for m in messages %}{% if m.reasoning_content %}<think>"
                "{{ m.reasoning_content }}</think>{% endif %}{{ m.content }}\n{% endfor %}")
    directory = _directory(tmp_path, template)
    theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
    ours = load_chat_template(directory)
    messages = [{"role": "user", "content": "q"},
                {"role": "assistant", "content": "", "reasoning": "let me"}]
    text = ours.render(messages, continue_final_message="reasoning_content")
    assert text == "q\n<think>let me" == theirs.apply_chat_template(
        messages, tokenize=False, continue_final_message="reasoning_content")
    with pytest.raises(ValueError, match="the chat template never reads 'tool_calls'"):
        ours.render(messages + [{"role": "assistant", "content": "x", "tool_calls": "c"}],
                    continue_final_message="tool_calls")
    with pytest.raises(ValueError, match="the last message has no 'content' to continue"):
        ours.render([{"role": "assistant"}], continue_final_message=True)
    cut = ChatTemplate("{% for m in messages %}{{ m.content[:3] }}{% endfor %}")
    with pytest.raises(ChatTemplateError, match="does not write the last message's text as "
                                                "given"):
        cut.render(messages[:1] + [{"role": "assistant", "content": "abcdef"}],
                   continue_final_message=True)


def test_where_the_template_comes_from(tmp_path):
    """chat_template.jinja before tokenizer_config.json's; a list of named templates gives
    its "default"; none: None."""
    both = _directory(tmp_path, HEADERS, jinja=CHATML, name="both")
    assert load_chat_template(both).source == CHATML
    assert load_chat_template(both).special_tokens == {"bos_token": "<s>", "eos_token": "</s>",
                                                       "pad_token": "<pad>"}
    named = _directory(tmp_path, [{"name": "tool_use", "template": CHATML},
                                  {"name": "default", "template": HEADERS}], name="named")
    assert load_chat_template(named).source == HEADERS
    assert load_chat_template(_directory(tmp_path, name="none")) is None
    # chat_template.json is a processor's file: transformers' tokenizer reads
    # tokenizer_config.json's template, and the file only where there is no other.
    for name, template in (("config_and_json", HEADERS), ("json_only", None)):
        directory = _directory(tmp_path, template, name=name)
        (directory / "chat_template.json").write_text(json.dumps({"chat_template": CHATML}))
        assert load_chat_template(directory).source == (template or CHATML)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "config_and_json"))
    assert theirs.chat_template == HEADERS


@dataclasses.dataclass
class _Message:  # a message object, as an API client's
    role: str
    content: str
    tool_calls: list | None = None


def test_fields_set_to_none_are_left_out_as_transformers_does(tmp_path):
    """APIs send `tool_calls=None`; transformers drops None fields (and takes message
    objects), so a template testing for the field renders the plain turn."""
    template = ("{% for m in messages %}{% if 'tool_calls' in m %}[calls {{ m.tool_calls | "
                "length }}]{% endif %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    directory = _directory(tmp_path, template)
    theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
    conversation = [{"role": "user", "content": "hi", "tool_calls": None},
                    _Message("assistant", "hello")]
    text = load_chat_template(directory).render(conversation, add_generation_prompt=False)
    assert text == "user: hi\nassistant: hello\n" == theirs.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=False)


@pytest.mark.parametrize("template,message", [
    ("{% for m in messages %}", "does not compile"),
    ([{"name": "tool_use", "template": CHATML}], "none named 'default'"),
    (7, "must be a string or a list"),
])
def test_broken_templates_are_named_when_loaded(tmp_path, template, message):
    with pytest.raises(ChatTemplateError, match=message):
        load_chat_template(_directory(tmp_path, template))


def test_a_template_refusing_a_conversation_and_bad_messages(tmp_path):
    chat = load_chat_template(_directory(tmp_path, HEADERS))
    with pytest.raises(ChatTemplateError, match="refused the conversation: roles must "
                       "alternate"):
        chat.render([{"role": "assistant", "content": "first"}])
    for messages, match in [("hi", "non-empty list"), ([], "non-empty list"),
                            ([{"content": "no role"}], r"messages\[0\]")]:
        with pytest.raises(TypeError, match=match):
            chat.render(messages)
    with pytest.raises(TypeError, match="add_generation_prompt"):
        chat.render(CONVERSATIONS[0], add_generation_prompt="yes")
    # A template whose own code fails on a conversation is named, not a bare TypeError.
    failing = ChatTemplate(source="{{ messages[0].content | length + 'x' }}", origin="t.jinja")
    with pytest.raises(ChatTemplateError, match="t.jinja failed on the conversation: TypeError"):
        failing.render(CONVERSATIONS[0])


@pytest.fixture(scope="module")
def chat_checkpoint(tokenized_checkpoint, tmp_path_factory):
    directory = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(tokenized_checkpoint, directory)
    (directory / "tokenizer_config.json").write_text(json.dumps(
        dict(SPECIAL, chat_template=HEADERS, model_max_length=512)))
    return directory


def test_load_and_save_keep_the_template(chat_checkpoint, tmp_path):
    model = jaxdec.load_pretrained(chat_checkpoint)
    assert model.chat_template.source == HEADERS
    assert model.with_attention("reference").chat_template is model.chat_template
    out = jaxdec.save_pretrained(model, tmp_path / "out")
    assert jaxdec.load_pretrained(out).chat_template == model.chat_template
    # Into a directory with its own tokenizer_config.json: its other fields are kept.
    target = tmp_path / "mine"
    target.mkdir()
    (target / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    jaxdec.save_pretrained(model, target, overwrite=True)
    saved = json.loads((target / "tokenizer_config.json").read_text())
    assert saved["model_max_length"] == 77 and saved["chat_template"] == HEADERS
    # A template file there (read first) gets the model's template too.
    (target / "chat_template.jinja").write_text(CHATML)
    jaxdec.save_pretrained(model, target, overwrite=True)
    assert jaxdec.load_pretrained(target).chat_template.source == HEADERS
    (target / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        jaxdec.save_pretrained(model, target, overwrite=True)
    assert (target / "tokenizer_config.json").read_text() == "{not json"


def test_a_broken_template_does_not_stop_the_model_loading(chat_checkpoint, tmp_path, capsys):
    directory = tmp_path / "broken"
    shutil.copytree(chat_checkpoint, directory)
    (directory / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.warns(UserWarning, match="loading without a chat template.*does not compile"):
        model = jaxdec.load_pretrained(directory)
    assert model.chat_template is None and model.tokenizer is not None
    # Chatting with it names the template's fault, not a missing template.
    for command in (["generate", "--prompt", "x", "--chat"], ["chat"]):
        with pytest.warns(UserWarning):
            assert main([command[0], "--model", str(directory), *command[1:]]) == 2
        err = capsys.readouterr().err
        assert "chat template cannot be used" in err and "does not compile" in err, err


def test_cli_chat_prints_the_reply(chat_checkpoint, capsys):
    assert main(["generate", "--model", str(chat_checkpoint), "--prompt", "the fox",
                 "--system", "be brief", "--chat", "--max-new-tokens", "5",
                 "--ignore-eos"]) == 0
    reply = capsys.readouterr().out.strip().split("\n")[-1]
    model = jaxdec.load_pretrained(chat_checkpoint)
    ids = encode_chat(model, [{"role": "system", "content": "be brief"},
                              {"role": "user", "content": "the fox"}])
    tokens = jaxdec.generate(model, [ids], max_new_tokens=5).to_lists()[0]
    assert reply == model.tokenizer.decode(tokens)


def test_cli_chat_errors(chat_checkpoint, tokenized_checkpoint, capsys):
    assert main(["generate", "--model", str(chat_checkpoint), "--prompt", "x",
                 "--system", "s"]) == 2
    assert "--system needs --chat" in capsys.readouterr().err
    assert main(["generate", "--model", tokenized_checkpoint, "--prompt", "x", "--chat"]) == 2
    assert "no chat template" in capsys.readouterr().err
    assert main(["chat", "--model", str(chat_checkpoint), "--max-context", "64",
                 "--max-new-tokens", "64"]) == 2
    assert "--max-context 64 leaves no room for a message beside --max-new-tokens 64" in \
        capsys.readouterr().err
    positions = jaxdec.ModelConfig.from_hf(chat_checkpoint).max_positions
    assert main(["chat", "--model", str(chat_checkpoint), "--max-new-tokens",
                 str(positions)]) == 2
    assert f"the model's {positions} positions leave no room" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(tokenized_checkpoint, "tokenizer_config.json"))


def test_cli_chat_refuses_a_system_message_the_template_does_not_take(chat_checkpoint, tmp_path,
                                                                     capsys, monkeypatch):
    """Told before the first message is read (it was lost with the chat's end)."""
    directory = tmp_path / "no-system"
    shutil.copytree(chat_checkpoint, directory)
    refusing = ("{% if messages[0].role == 'system' %}{{ raise_exception('System role not "
                "supported') }}{% endif %}" + HEADERS)
    (directory / "tokenizer_config.json").write_text(json.dumps(
        dict(SPECIAL, chat_template=refusing)))
    read = []
    monkeypatch.setattr("sys.stdin", _Lines(read, "the fox\n"))
    assert main(["chat", "--model", str(directory), "--system", "be brief"]) == 2
    assert "System role not supported" in capsys.readouterr().err and read == []


class _Lines(io.StringIO):
    """Standard input noting each line read."""

    def __init__(self, read, text):
        super().__init__(text)
        self.read_lines = read

    def readline(self, *args):
        line = super().readline(*args)
        self.read_lines.append(line)
        return line


def test_a_terminal_keeps_its_encoding():
    """What a terminal's keyboard types is in its own encoding (a Latin-1 terminal's "café"
    read as UTF-8 was refused as no text); pipes are read as UTF-8."""
    from jaxdec.cli import _keep_undecodable_bytes

    class Terminal(io.BytesIO):
        def isatty(self):
            return True

    typed = io.TextIOWrapper(Terminal("caf\u00e9\n".encode("latin-1")), encoding="latin-1")
    _keep_undecodable_bytes(typed)
    assert typed.encoding == "latin-1" and typed.readline() == "caf\u00e9\n"
    piped = io.TextIOWrapper(io.BytesIO("caf\u00e9\n".encode("utf-8")), encoding="latin-1")
    _keep_undecodable_bytes(piped)
    assert piped.encoding == "utf-8" and piped.readline() == "caf\u00e9\n"


def test_cli_chat_reads_utf8_whatever_the_locale_says(chat_checkpoint, capsys, monkeypatch):
    """Standard input as UTF-8 (a Windows pipe's cp1252 turned the message into other text,
    and printing a reply's character cp1252 lacks ended the chat), its byte-order mark no
    part of the first message."""
    raw = io.BytesIO("\ufeffthe fox \u00e9\U0001f600\n".encode("utf-8"))
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(raw, encoding="cp1252"))
    assert main(["chat", "--model", str(chat_checkpoint), "--system", "be brief",
                 "--max-new-tokens", "4", "--ignore-eos"]) == 0
    model = jaxdec.load_pretrained(chat_checkpoint)
    assert capsys.readouterr().out.split("\n")[0] == _replies(
        model, "be brief", ["the fox \u00e9\U0001f600"], 4)[0]


def _replies(model, system, lines, max_new_tokens):
    """What `jaxdec chat` should answer: each turn greedy over the conversation so far."""
    messages, replies = [{"role": "system", "content": system}], []
    for line in lines:
        messages.append({"role": "user", "content": line})
        ids = encode_chat(model, messages)
        tokens = jaxdec.generate(model, [ids], max_new_tokens=max_new_tokens).to_lists()[0]
        replies.append(model.tokenizer.decode(tokens))
        messages.append({"role": "assistant", "content": replies[-1]})
    return replies


@pytest.mark.parametrize("method", [[], ["--draft", "SELF", "--tree", "kary:2:2"]],
                         ids=["plain", "speculative"])
def test_cli_chat_conversation(chat_checkpoint, method, capsys, monkeypatch):
    """Two turns from standard input (a blank line skipped): each reply is the model's
    greedy answer to the whole conversation so far (drafting for itself: the same)."""
    monkeypatch.setattr("sys.stdin", io.StringIO("the fox\n\nhello world\n"))
    method = [str(chat_checkpoint) if m == "SELF" else m for m in method]
    assert main(["chat", "--model", str(chat_checkpoint), "--system", "be brief",
                 "--max-new-tokens", "4"] + method) == 0
    out, err = capsys.readouterr()
    model = jaxdec.load_pretrained(chat_checkpoint)
    assert out.split("\n")[:2] == _replies(model, "be brief", ["the fox", "hello world"], 4)
    assert len(re.findall(r"^\[4 tokens[,\]]", err, flags=re.M)) == 2  # (not "288.4 tokens/s")


def test_cli_chat_drops_what_no_longer_fits(chat_checkpoint, capsys, monkeypatch):
    model = jaxdec.load_pretrained(chat_checkpoint)
    first = encode_chat(model, [{"role": "user", "content": "the fox"}])
    # Room for the first exchange, not for two: the second turn drops the first; a message
    # that cannot fit even alone is refused, and the chat goes on.
    new = model.config.max_positions - len(first) - 4
    too_long = "fox " * model.config.max_positions
    monkeypatch.setattr("sys.stdin", io.StringIO(f"the fox\nthe dog\n{too_long}\nthe fox\n"))
    assert main(["chat", "--model", str(chat_checkpoint), "--max-new-tokens", str(new),
                 "--ignore-eos"]) == 0
    out, err = capsys.readouterr()
    assert "the oldest exchange no longer fits: dropped" in err
    assert "too long" in err
    lines = out.split("\n")
    assert lines[0] == lines[2]  # the last turn saw only itself again, as the first did


def test_cli_chat_refuses_a_message_without_losing_the_conversation(chat_checkpoint, capsys,
                                                                    monkeypatch):
    """A message too long to fit even alone, and one that is not UTF-8 (standard input keeps
    undecodable bytes as escapes), are refused; the conversation before them stays whole."""
    import jaxdec.chat as chat

    rendered, encode = [], chat.encode_chat

    def spy(model, messages, **kwargs):
        rendered.append([m["content"] for m in messages])
        return encode(model, messages, **kwargs)

    monkeypatch.setattr(chat, "encode_chat", spy)
    model = jaxdec.load_pretrained(chat_checkpoint)
    # Room for two turns, not for the long message alone.
    two = len(encode(model, [{"role": "user", "content": "the fox"}, {"role": "assistant",
                              "content": "the lazy dog"}, {"role": "user", "content": "the dog"}]))
    too_long = "fox " * two
    monkeypatch.setattr("sys.stdin", io.StringIO(f"the fox\n{too_long}\ncaf\udce9\nthe dog\n"))
    assert main(["chat", "--model", str(chat_checkpoint), "--max-context", str(two + 8),
                 "--max-new-tokens", "4", "--ignore-eos"]) == 0
    out, err = capsys.readouterr()
    assert "[too long: the message takes" in err and "not UTF-8 text" in err
    assert "dropped" not in err
    first_reply = out.split("\n")[0]
    assert rendered[-1] == ["the fox", first_reply, "the dog"]
