"""The gates: every gate row the qualification decides, by family.

- rows: GateRow, the statuses and the TSV gate table;
- registry: every gate ID with its family, report order, specificity and evaluating function;
- artifact: per-artifact gates (G0-*, F-LAYOUT-*);
- edges: comparison gates (F-CONV edges, round trips, idempotency, commutativity);
- contracts: each artifact against its parent (F-CONTRACT-I2..I5);
- output_contract: the output-path contract (F-CONTRACT-OUTPUT);
- inference: F-INF, F-INF-REF, F-ENGINE-001, F-SERVE-001 from recorded runs;
- parity: tokenizer and chat-template parity (F-TOK-001, F-CHAT-001) from parity records;
- cross_converter: a second converter on an edge (F-XCONV-001);
- tensor_table, inference_table: the gate tables of rules tensor_gates and inference_gates.

Import from the family module (`from convqa.gates.rows import GateRow`); this package re-exports
nothing.
"""
