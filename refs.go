package batch

import (
	"bytes"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"github.com/tidwall/gjson"
	"golang.org/x/net/http/httpguts"
)

// References: {{ID.status}}, {{ID.headers.NAME}}, {{ID.body}} and
// {{ID.body.GJSON_PATH}} in an operation's path, header values and body
// strings stand for parts of the answer of operation ID.

// What a reference points at.
const (
	refStatus = iota
	refHeader
	refBody
)

// ref is one reference, as written and resolved to an operation index.
type ref struct {
	raw  string // "{{...}}" as written, for error messages
	id   string
	op   int // index of the operation referred to
	kind int
	arg  string // header name, or GJSON path ("" for the whole body)
}

// piece is a run of literal text or one reference; a template is a list of
// them.
type piece struct {
	lit string
	ref *ref
}

// template holds the parts of an operation that have references. An
// operation without any has none and is sent byte for byte as written.
type template struct {
	target  []piece
	headers []headerTemplate
	body    []bodySegment
	// textBody is set when the body was written as a JSON string: it is
	// text, and references are inserted into it as text.
	textBody bool
}

type headerTemplate struct {
	name  string
	index int // which of the header's values
	value []piece
}

// bodySegment is a run of raw JSON copied as is, or one JSON string value
// with references in it.
type bodySegment struct {
	raw []byte
	str []piece
}

// refs lists every reference of the template.
func (t *template) refs() []*ref {
	var out []*ref
	add := func(ps []piece) {
		for _, p := range ps {
			if p.ref != nil {
				out = append(out, p.ref)
			}
		}
	}
	add(t.target)
	for _, h := range t.headers {
		add(h.value)
	}
	for _, s := range t.body {
		add(s.str)
	}
	return out
}

// parsePieces splits s at its references. It returns nil when s has none,
// and a message when a reference is malformed. Text in {{ }} that does not
// start with an id and a dot is no reference and stays as written.
func parsePieces(s string) ([]piece, string) {
	if !strings.Contains(s, "{{") {
		return nil, ""
	}
	var out []piece
	rest := s
	lit := strings.Builder{}
	found := false
	for {
		i := strings.Index(rest, "{{")
		if i < 0 {
			break
		}
		j := strings.Index(rest[i+2:], "}}")
		if j < 0 {
			break
		}
		inner := rest[i+2 : i+2+j]
		id, part, ok := strings.Cut(inner, ".")
		if !ok || !validID(id) {
			lit.WriteString(rest[:i+2])
			rest = rest[i+2:]
			continue
		}
		r := &ref{raw: "{{" + inner + "}}", id: id}
		switch {
		case part == "status":
			r.kind = refStatus
		case part == "body":
			r.kind = refBody
		case strings.HasPrefix(part, "body."):
			r.kind, r.arg = refBody, part[len("body."):]
		case strings.HasPrefix(part, "headers.") && httpguts.ValidHeaderFieldName(part[len("headers."):]):
			r.kind, r.arg = refHeader, http.CanonicalHeaderKey(part[len("headers."):])
		default:
			return nil, fmt.Sprintf("reference %s must be {{ID.status}}, {{ID.headers.NAME}}, {{ID.body}} or {{ID.body.PATH}}", r.raw)
		}
		lit.WriteString(rest[:i])
		if lit.Len() > 0 {
			out = append(out, piece{lit: lit.String()})
			lit.Reset()
		}
		out = append(out, piece{ref: r})
		found = true
		rest = rest[i+2+j+2:]
	}
	if !found {
		return nil, ""
	}
	lit.WriteString(rest)
	if lit.Len() > 0 {
		out = append(out, piece{lit: lit.String()})
	}
	return out, ""
}

// probeTarget stands a harmless segment in for each reference of a target
// that starts with literal text, so that its shape can be checked before
// the references are known.
func probeTarget(ps []piece) string {
	var sb strings.Builder
	for _, p := range ps {
		if p.ref == nil {
			sb.WriteString(p.lit)
		} else {
			sb.WriteString("x")
		}
	}
	return sb.String()
}

// parseTemplate finds the references of op. body is the operation's body
// as written in the batch (raw JSON), or the zero Result.
func (p *parser) parseTemplate(op *operation, body gjson.Result) {
	var t template
	var msg string
	if t.target, msg = parsePieces(op.target); msg != "" {
		p.opFault(op, "path: %s", msg)
	}
	for name, values := range op.header {
		for i, v := range values {
			ps, msg := parsePieces(v)
			if msg != "" {
				p.opFault(op, "header %s: %s", name, msg)
			}
			if ps != nil {
				t.headers = append(t.headers, headerTemplate{name: name, index: i, value: ps})
			}
		}
	}
	if body.Exists() && strings.Contains(body.Raw, "{{") {
		if body.Type == gjson.String {
			// A text body: references are inserted as text, but a body that
			// is exactly one reference is that value, with its type.
			ps, msg := parsePieces(body.Str)
			if msg != "" {
				p.opFault(op, "body: %s", msg)
			}
			if ps != nil {
				whole := len(ps) == 1 && ps[0].ref != nil
				t.body, t.textBody = []bodySegment{{str: ps}}, !whole
			}
		} else if t.body, msg = jsonTemplate([]byte(body.Raw)); msg != "" {
			p.opFault(op, "body: %s", msg)
		}
	}
	if t.target != nil || t.headers != nil || t.body != nil {
		tt := t // only a template with references goes to the heap
		op.tmpl = &tt
		p.linked = true
	}
}

// jsonTemplate splits a raw JSON value into raw runs and the string values
// (not keys) that hold references.
func jsonTemplate(raw []byte) ([]bodySegment, string) {
	var segs []bodySegment
	last := 0
	for i := 0; i < len(raw); i++ {
		if raw[i] != '"' {
			continue
		}
		end := i + 1
		for end < len(raw) && raw[end] != '"' {
			if raw[end] == '\\' {
				end++
			}
			end++
		}
		end++ // past the closing quote
		tok := raw[i:end]
		k := end
		for k < len(raw) && (raw[k] == ' ' || raw[k] == '\t' || raw[k] == '\n' || raw[k] == '\r') {
			k++
		}
		isKey := k < len(raw) && raw[k] == ':'
		if !isKey && bytes.Contains(tok, []byte("{{")) {
			ps, msg := parsePieces(gjson.ParseBytes(tok).Str)
			if msg != "" {
				return nil, msg
			}
			if ps != nil {
				if i > last {
					segs = append(segs, bodySegment{raw: raw[last:i]})
				}
				segs = append(segs, bodySegment{str: ps})
				last = end
			}
		}
		i = end - 1
	}
	if segs == nil {
		return nil, ""
	}
	if last < len(raw) {
		segs = append(segs, bodySegment{raw: raw[last:]})
	}
	return segs, ""
}

// unresolvedError is a reference that cannot be filled in; the operation is
// not run and answers 424.
type unresolvedError struct{ msg string }

func (e unresolvedError) Error() string { return e.msg }

func unresolved(format string, args ...any) error {
	return unresolvedError{msg: fmt.Sprintf(format, args...)}
}

// resolve returns op with its references filled in from results. op itself
// is left as it is: a rollback may be resolved again.
func (rn *runner) resolve(op *operation) (*operation, error) {
	t := op.tmpl
	if t == nil {
		return op, nil
	}
	out := *op
	if t.target != nil {
		target, err := rn.render(t.target, escapeTarget)
		if err != nil {
			return nil, err
		}
		u, msg := parseTarget(target)
		if msg != "" {
			return nil, unresolved("after references, %s", msg)
		}
		if rn.h.limits.pathAllow != nil && !rn.h.limits.pathAllow(u) {
			return nil, unresolved("after references, path %q is not allowed here", u.Path)
		}
		out.target, out.url = target, u
	}
	if t.headers != nil {
		out.header = op.header.Clone()
		for _, ht := range t.headers {
			v, err := rn.render(ht.value, nil)
			if err != nil {
				return nil, err
			}
			if !httpguts.ValidHeaderFieldValue(v) {
				return nil, unresolved("after references, header %s has control characters", ht.name)
			}
			out.header[ht.name][ht.index] = v
		}
	}
	switch {
	case t.textBody:
		s, err := rn.render(t.body[0].str, nil)
		if err != nil {
			return nil, err
		}
		out.body = []byte(s)
	case t.body != nil:
		var body []byte
		for _, seg := range t.body {
			switch {
			case seg.raw != nil:
				body = append(body, seg.raw...)
			case len(seg.str) == 1:
				// Exactly one reference: its JSON value, with its type.
				v, err := rn.value(seg.str[0].ref)
				if err != nil {
					return nil, err
				}
				body = append(body, v.json()...)
			default:
				s, err := rn.render(seg.str, nil)
				if err != nil {
					return nil, err
				}
				body = appendString(body, s)
			}
		}
		out.body = body
	}
	return &out, nil
}

// render joins pieces into text; escape, when set, is applied to each
// referenced value given the text before it.
func (rn *runner) render(ps []piece, escape func(before, v string) string) (string, error) {
	var sb strings.Builder
	for _, p := range ps {
		if p.ref == nil {
			sb.WriteString(p.lit)
			continue
		}
		v, err := rn.value(p.ref)
		if err != nil {
			return "", err
		}
		s := v.text()
		if escape != nil {
			s = escape(sb.String(), s)
		}
		sb.WriteString(s)
	}
	return sb.String(), nil
}

// escapeTarget escapes a value inserted into a request target: as a path
// segment before any '?', as a query component after it. A value that
// starts the target is the path itself (a Location header, say) and goes in
// as is; the whole target is checked again afterwards.
func escapeTarget(before, v string) string {
	if before == "" {
		return v
	}
	if strings.Contains(before, "?") {
		return url.QueryEscape(v)
	}
	return url.PathEscape(v)
}

// refValue is the value a reference resolved to.
type refValue struct {
	raw    string // JSON
	isText bool   // raw is not JSON but text (a non-JSON body)
}

// json returns the value as JSON.
func (v refValue) json() []byte {
	if v.isText {
		return appendString(nil, v.raw)
	}
	return []byte(v.raw)
}

// text returns the value as text: strings without their quotes.
func (v refValue) text() string {
	if v.isText {
		return v.raw
	}
	if r := gjson.Parse(v.raw); r.Type == gjson.String {
		return r.Str
	}
	return v.raw
}

// value looks up what r points at in the answer it refers to.
func (rn *runner) value(r *ref) (refValue, error) {
	res := &rn.results[r.op]
	if res.status == 0 {
		return refValue{}, unresolved("reference %s: operation %s has not run", r.raw, r.id)
	}
	if failed(res) {
		return refValue{}, unresolved("reference %s: operation %s failed with status %d", r.raw, r.id, res.status)
	}
	switch r.kind {
	case refStatus:
		return refValue{raw: strconv.Itoa(res.status)}, nil
	case refHeader:
		vs, ok := res.header[r.arg]
		if !ok {
			return refValue{}, unresolved("reference %s: operation %s has no header %s", r.raw, r.id, r.arg)
		}
		return refValue{raw: strings.Join(vs, ", "), isText: true}, nil
	}
	body := res.body
	isJSON := jsonBody(res)
	if r.arg == "" {
		if isJSON {
			return refValue{raw: string(body)}, nil
		}
		return refValue{raw: string(body), isText: true}, nil
	}
	if !isJSON {
		return refValue{}, unresolved("reference %s: operation %s did not answer JSON", r.raw, r.id)
	}
	v := gjson.GetBytes(body, r.arg)
	if !v.Exists() {
		return refValue{}, unresolved("reference %s: no %q in the answer of operation %s", r.raw, r.arg, r.id)
	}
	return refValue{raw: v.Raw}, nil
}
