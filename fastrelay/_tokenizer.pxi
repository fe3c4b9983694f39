# The conf tokeniser (spec: fastrelay/_purepy/tokenizer.py). Not written yet.

def tokenize(data, filename="<string>"):
    raise NotImplementedError("tokenize: not written yet")
