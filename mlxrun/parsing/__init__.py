"""Reading model output: tool calls, reasoning, streamed JSON (used by the server and chat)."""
