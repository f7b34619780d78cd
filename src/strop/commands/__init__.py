"""The verbs' own code, beside the CLI (strop.cli): what a command does with the layers below
it (data, model, adapters) and how it shows the result. The layers never import from here."""
