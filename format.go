package batch

import "strings"

// isJSONType reports whether a Content-Type is application/json or
// application/*+json.
func isJSONType(ct string) bool {
	// Read per result: no mime.ParseMediaType, which allocates.
	if ct == "application/json" {
		return true
	}
	mt, _, _ := strings.Cut(ct, ";")
	mt = strings.TrimSpace(mt)
	const app, suffix = "application/", "+json"
	return strings.EqualFold(mt, "application/json") ||
		len(mt) > len(app)+len(suffix) && strings.EqualFold(mt[:len(app)], app) && strings.EqualFold(mt[len(mt)-len(suffix):], suffix)
}

// splitComma splits a comma-separated header value into trimmed parts.
func splitComma(v string) []string {
	var parts []string
	for p := range strings.SplitSeq(v, ",") {
		if p = strings.TrimSpace(p); p != "" {
			parts = append(parts, p)
		}
	}
	return parts
}
