"""Readers of every input file the library takes, each with one-line errors naming the fix.

==========================================  ===================================================
input                                       reader
==========================================  ===================================================
facts JSONL, CounterFact, zsRE, MQuAKE      :func:`edit.readers.records.load_records` -> Record
training corpora (text, QA, prompt/compl.)  :func:`edit.readers.corpus.read_corpus` -> Example
TOFU QA sets (answers to score)             :func:`edit.readers.tofu.read_qa` -> QA
plain text for key statistics               :func:`edit.readers.text.text_source` -> TextSource
==========================================  ===================================================

Which format a file or a row is in is decided in :mod:`edit.readers.formats` only; the JSON
and JSON Lines parsing the readers share is :mod:`edit.readers.rows`. ROME's known-facts list
(``known_1000.json``) is read by :func:`edit.readers.known.load_known`.
"""
