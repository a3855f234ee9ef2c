"""The sample's assets, for `make run`, tests and CPU benchmarks, built locally (nothing is
downloaded).

- synthetic `chat-tools` JSONL in three categories: templated requests in varied phrasings
  whose tool-call arguments are copied from the user's words (so a model can learn to copy),
  each argument value one token (a word, a workflow number, a colleague's name, an app, an
  account) so that a tiny model learns the task in minutes on a CPU;
- a BPE tokenizer trained with `tokenizers` on such chats, wrapped as `PreTrainedTokenizerFast`
  with a Qwen-style, tools-capable chat template (Hermes `<tool_call>` format). Words, digit
  runs and the punctuation between them are pre-tokenized apart, so a value is the same tokens
  in the user's sentence and in the JSON arguments;
- a randomly initialised Qwen3 model with tiny dimensions (`SAMPLE_MODEL`: the size that
  learns the sample task within `make run`'s CPU budget).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>",
                  "<tool_response>", "</tool_response>"]

# Qwen-style template; {% generation %} marks what the loss covers (content, tool calls, end).
CHAT_TEMPLATE = (
    "{%- if tools or messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content }}{%- endif %}"
    "{%- if tools %}"
    "{{- '\\n# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\nCall functions inside <tool_call></tool_call> tags.' }}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'user' or message.role == 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}"
    "{{- message.content }}"
    "{%- for tc in message.tool_calls or [] %}"
    "{%- if loop.first and message.content %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + tc.function.name + '\", \"arguments\": ' }}"
    "{{- tc.function.arguments | tojson }}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>' }}"
    "{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content }}"
    "{{- '\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CATEGORIES = ("edit-workflow", "email", "integration")
# Tools by name only (their arguments are learned from the examples): a short system prompt
# keeps the tiny model's attention on the request, and training cheap.
TOOLS = {
    "edit-workflow": {"type": "function", "function": {"name": "update_workflow"}},
    "email": {"type": "function", "function": {"name": "send_email"}},
    "integration": {"type": "function", "function": {"name": "connect_app"}},
}
WORDS = ["alpha", "beta", "gamma", "delta", "sales", "report", "weekly", "ops", "lead", "crm",
         "billing", "onboarding", "invoice", "review", "growth", "support", "launch", "triage",
         "payroll", "audit", "renewal", "churn", "pipeline", "digest", "sync", "backlog"]
PEOPLE = ["ana", "ben", "chloe", "dev", "emma", "farid", "grace", "hugo", "ines", "jonas",
          "kate", "liam", "mia", "noah", "olga", "pablo", "rosa", "sam", "tara", "yuki",
          "amir", "bea", "carlos", "dana", "eli", "fatima", "gus", "hana", "ivan", "jade",
          "kofi", "lena", "marco", "nina", "omar", "priya", "quinn", "ravi", "sofia", "tom"]
EMAIL_DOMAIN = "example.com"  # colleagues' addresses: one company domain
DOMAINS = ["acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne",
           "soylent", "vandelay", "cyberdyne", "tyrell", "wonka", "oscorp", "aperture", "massive",
           "contoso", "fabrikam", "northwind", "tailspin", "litware", "adatum", "proseware",
           "wingtip", "fourth", "lucerne", "margie", "nod", "trey", "woodgrove", "alpine"]
APPS = ["slack", "github", "jira", "notion", "hubspot", "zendesk", "stripe", "asana", "trello",
        "gitlab", "dropbox", "figma", "linear", "airtable", "intercom", "shopify", "zoom", "okta",
        "salesforce", "mailchimp", "twilio", "datadog", "sentry", "pagerduty"]

# How users ask, per category. Week 1's data uses PHRASINGS; the next week's data also has
# NEW_PHRASINGS (users started asking that way), which week 1 never saw.
PHRASINGS = {
    "edit-workflow": ["Rename workflow {wid} to {name}.",
                      "Please change the name of workflow {wid} to {name}.",
                      "Workflow {wid} should be called {name} from now on.",
                      "Can you rename {wid} as {name}?"],
    "email": ["Email {to} about {subject}.",
              "Send a message to {to} with the subject {subject}.",
              "Please write to {to} regarding {subject}.",
              "Could you mail {to}? Subject: {subject}."],
    "integration": ["Connect {app} for {account} please.",
                    "Hook up the {account} {app} account.",
                    "Can you link {app} to the {account} workspace?",
                    "{account} needs the {app} integration enabled."],
}
NEW_PHRASINGS = {
    "edit-workflow": ["I'd like {wid} renamed, call it {name}."],
    "email": ["Drop {to} a quick note on {subject}."],
    "integration": ["We at {account} just signed up for {app}, set it up."],
}


def conversation(rng: random.Random, category: str, new_phrasings: float = 0.0) -> dict:
    """One synthetic tool-calling conversation of the given category; `new_phrasings` is the
    share of requests asked in one of NEW_PHRASINGS."""
    new = rng.random() < new_phrasings
    template = rng.choice(NEW_PHRASINGS[category] if new else PHRASINGS[category])
    if category == "edit-workflow":
        wid, name = f"W{rng.randint(10, 99)}", rng.choice(WORDS)
        ask = template.format(wid=wid, name=name)
        fn, args = "update_workflow", {"workflow_id": wid, "name": name}
        done = f"Workflow {wid} is now called {name}."
    elif category == "email":
        to = f"{rng.choice(PEOPLE)}@{EMAIL_DOMAIN}"
        subject = rng.choice(WORDS)
        ask = template.format(to=to, subject=subject)
        fn, args = "send_email", {"to": to, "subject": subject}
        done = f"Sent the {subject} e-mail to {to}."
    else:
        app, account = rng.choice(APPS), rng.choice(DOMAINS)
        ask = template.format(app=app, account=account)
        fn, args = "connect_app", {"app": app, "account": account}
        done = f"{app} is connected for {account}."
    return {
        "category": category,
        "tools": list(TOOLS.values()),
        "messages": [
            {"role": "system", "content": "You are a workflow assistant."},
            {"role": "user", "content": ask},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": fn, "arguments": json.dumps(args)}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"ok": true}'},
            {"role": "assistant", "content": done},
        ],
    }


def write_dataset(path: str | Path, n: int, seed: int, categories=CATEGORIES,
                  new_phrasings: float = 0.0, exclude: set[str] = frozenset()) -> Path:
    """`n` conversations, categories in turn, none of whose user requests is in `exclude` and
    none repeated (so a held-out eval set really is held out: see `requests`)."""
    rng = random.Random(seed)
    seen = set(exclude)
    path = Path(path)
    with path.open("w") as f:
        for i in range(n):
            for _ in range(1000):
                conv = conversation(rng, categories[i % len(categories)], new_phrasings)
                if conv["messages"][1]["content"] not in seen:
                    break
            seen.add(conv["messages"][1]["content"])
            f.write(json.dumps(conv) + "\n")
    return path


def requests(path: str | Path) -> set[str]:
    """The user requests of a dataset written by `write_dataset`."""
    return {json.loads(line)["messages"][1]["content"]
            for line in Path(path).read_text().splitlines() if line.strip()}


def build_tokenizer(vocab_size: int = 600):
    """BPE trained on synthetic chats, with the tools-capable chat template. Letter runs,
    digit runs and the punctuation/space runs between them are separate pre-tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [" ".join(WORDS + PEOPLE + DOMAINS + APPS + [EMAIL_DOMAIN]),
              " ".join(f"W{n}" for n in range(10, 100)) * 2,
              "system user assistant # Tools Call functions inside tags."]
    for i in range(600):
        c = conversation(rng, CATEGORIES[i % 3], new_phrasings=0.2)
        corpus += [m["content"] or "" for m in c["messages"]]
        corpus += [json.dumps(t) for t in c["tools"]]
        corpus += [json.dumps({"name": t["function"]["name"],
                               "arguments": json.loads(t["function"]["arguments"])})
                   for m in c["messages"] for t in m.get("tool_calls") or []]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r'[A-Za-z_]+": "|[A-Za-z]+'), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# The size of `make run`'s model. Attention heads are wide (head_dim 64): with Qwen3's QK-norm
# the sharpest attention a head can start with grows with sqrt(head_dim), and copying an
# argument from the request needs one sharp look back.
SAMPLE_MODEL = {"hidden": 128, "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 64,
                "intermediate": 384}


def build_model_dir(path: str | Path, vocab_size: int, hidden: int = 64, layers: int = 2,
                    heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
                    head_dim: int | None = None, seed: int = 0, tokenizer=None) -> Path:
    """A randomly initialised tiny Qwen3 saved with save_pretrained (+ tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim or hidden // heads, max_position_embeddings=4096,
        tie_word_embeddings=True, dtype="float32",
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    path = Path(path)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
