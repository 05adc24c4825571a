"""Language models: a HF causal LM (+ LoRA) or a GGUF file into the contents of a text-generation
bundle. `plan` (what the build asked, the quantization chosen), `package` (the pipeline),
`bundle` (manifest, report, summary), `gguf` (convert, quantize, probe with llama.cpp), `eval`
(perplexity, golden completions, speed), `template` (the pinned chat template) and `table`
(every quantization of one model measured, for bench/). Nothing here imports the image pipeline.
"""
