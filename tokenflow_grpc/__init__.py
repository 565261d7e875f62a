"""TokenFlow: a rate limiter and response cache for AI text-generation APIs, served over gRPC."""
