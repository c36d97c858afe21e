"""The model server's data API: OpenAI completions/chat and the Sax LM methods."""
