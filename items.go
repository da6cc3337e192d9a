package batch

import (
	"fmt"
	"net/http"
	"net/url"
	"strings"

	"github.com/caddy-batch/batch/internal/jsontext"
	"github.com/tidwall/gjson"
	"golang.org/x/net/http/httpguts"
)

// Item templates: in the bulk form, {{item.PATH}} (a GJSON path into the
// item) in the operation's path, header values, key and body stands for
// a value of each item, filled in as the batch is parsed, so that each
// item's operation is checked like any other before anything runs.

// maxKeyLength bounds an operation's key (SPEC §14).
const maxKeyLength = 256

// maxItemRefs bounds the item references of one bulk operation: each
// walks every item once per path component.
const maxItemRefs = 64

// itemTemplate holds the parts of a bulk operation that hold item
// references; nil parts have none.
type itemTemplate struct {
	target  []piece
	headers []headerTemplate
	key     []piece
	// body is the body template split at its item references; a body
	// template without any is the operation's body, the same for all.
	body     []bodySegment
	textBody bool   // the template is a JSON string: text
	ctype    string // of a body template
}

// parseItemPieces splits s at its item references, as parsePieces does at
// answer references: nil when it has none, a message when one is
// malformed. Other {{…}} is text.
func parseItemPieces(s string) ([]piece, string) {
	const open = "{{item."
	if !strings.Contains(s, open) {
		return nil, ""
	}
	var out []piece
	lit := 0
	for i := 0; ; {
		k := strings.Index(s[i:], open)
		if k < 0 {
			break
		}
		i += k
		window := s[i+len(open) : min(len(s), i+len(open)+maxRefPart+2)]
		e := strings.Index(window, "}}")
		if e < 0 {
			return nil, fmt.Sprintf("item reference %s is not closed within %d bytes", short(s[i:]), maxRefPart)
		}
		r := &ref{raw: s[i : i+len(open)+e+2], id: "item", arg: window[:e]}
		if r.arg == "" {
			return nil, "{{item.}} needs a path into the item"
		}
		var msg string
		if r.parts, msg = checkRefPath(r.arg); msg != "" {
			return nil, fmt.Sprintf("item reference %s: %s", short(r.raw), msg)
		}
		if i > lit {
			out = append(out, piece{lit: s[lit:i]})
		}
		out = append(out, piece{ref: r})
		i += len(r.raw)
		lit = i
	}
	if lit < len(s) {
		out = append(out, piece{lit: s[lit:]})
	}
	return out, ""
}

// parseItemTemplate finds the item references of a bulk operation, and
// takes its body template, if it gives one (else each body is the item).
func (p *parser) parseItemTemplate(op *operation, body, encoding gjson.Result) {
	var t itemTemplate
	refs := 0
	count := func(ps []piece) {
		for _, pc := range ps {
			if pc.ref != nil {
				refs++
			}
		}
	}
	var msg string
	if t.target, msg = parseItemPieces(op.target); msg != "" {
		p.opFault(op, "path: %s", msg)
	}
	count(t.target)
	t.headers = p.headerTemplates(op, parseItemPieces)
	for _, h := range t.headers {
		count(h.value)
	}
	if t.key, msg = parseItemPieces(op.key); msg != "" {
		p.opFault(op, "key: %s", msg)
	}
	count(t.key)
	hasBody := body.Exists() && body.Type != gjson.Null
	switch {
	case hasBody && encoding.Exists():
		p.opFault(op, "body_encoding applies to the items: a body template is JSON")
	case hasBody && body.Type == gjson.String:
		ps, msg := parseItemPieces(body.Str)
		if msg != "" {
			p.opFault(op, "body: %s", msg)
		}
		// Text, unless it is exactly one reference: that value, with its
		// type.
		whole := len(ps) == 1 && ps[0].ref != nil
		t.ctype, t.textBody = "text/plain; charset=utf-8", ps != nil && !whole
		if whole {
			t.ctype = "application/json"
		}
		t.body = []bodySegment{{str: ps}}
		if ps == nil {
			t.body = []bodySegment{{raw: []byte(body.Str)}}
		}
		count(ps)
	case hasBody:
		t.ctype = "application/json"
		if t.body, msg = jsonTemplateOf([]byte(body.Raw), parseItemPieces); msg != "" {
			p.opFault(op, "body: %s", msg)
		}
		if t.body == nil {
			t.body = []bodySegment{{raw: []byte(body.Raw)}}
		}
		for _, seg := range t.body {
			count(seg.str)
		}
	}
	if refs > maxItemRefs {
		p.opFault(op, "more than %d item references", maxItemRefs)
	}
	if t.target != nil || t.headers != nil || t.key != nil || t.body != nil {
		op.items = &t
	}
}

// itemBudget is what filling in item templates may still cost a batch, or
// a chunk of a job: bytes of the operations made (max_reference_size) and
// item bytes walked (maxRefScan), as references are bounded.
type itemBudget struct {
	bytes, scan int64
}

// fillItem makes op, operation i of a bulk batch, from the bulk operation
// and its item.
func (p *parser) fillItem(op *operation, i int, bulk *operation, item, encoding gjson.Result, headerFor map[string]http.Header) {
	*op = operation{index: i, id: p.defaultID(i), method: bulk.method, target: bulk.target, header: bulk.header, key: bulk.key}
	t := bulk.items
	var ctype string
	switch {
	case t == nil || t.body == nil:
		ctype = p.parseBody(op, item, encoding)
	case t.textBody:
		s, ok := p.renderItem(op, t.body[0].str, item, "body", false)
		if !ok {
			return
		}
		op.body, ctype = []byte(s), t.ctype
	default:
		body, ok := p.renderItemBody(op, t.body, item)
		if !ok {
			return
		}
		op.body, ctype = body, t.ctype
	}
	if t != nil && t.headers != nil {
		op.header = bulk.header.Clone()
		for _, ht := range t.headers {
			v, ok := p.renderItem(op, ht.value, item, "header "+ht.name, false)
			if !ok {
				return
			}
			if !httpguts.ValidHeaderFieldValue(v) {
				p.opFault(op, "header %s has control characters once the item is filled in", ht.name)
				return
			}
			op.header[ht.name][ht.index] = v
		}
		if ctype != "" && op.header.Get("Content-Type") == "" {
			op.header["Content-Type"] = []string{ctype}
		}
	} else if ctype != "" && bulk.header.Get("Content-Type") == "" {
		// Operations share the bulk operation's header map; those whose
		// body needs a default Content-Type share one copy per type.
		h, ok := headerFor[ctype]
		if !ok {
			h = bulk.header.Clone()
			if h == nil {
				h = make(http.Header, 1)
			}
			h["Content-Type"] = []string{ctype}
			headerFor[ctype] = h
		}
		op.header = h
	}
	if t != nil && t.key != nil {
		k, ok := p.renderItem(op, t.key, item, "key", false)
		if !ok {
			return
		}
		if len(k) > maxKeyLength {
			p.opFault(op, "key is longer than %d bytes once the item is filled in", maxKeyLength)
			return
		}
		op.key = k
	}
	switch {
	case t != nil && t.target != nil:
		target, ok := p.renderItem(op, t.target, item, "path", true)
		if !ok {
			return
		}
		op.target = target
		op.url = p.checkTarget(op, target)
	case bulk.url != nil: // each its own: it becomes the sub-request's
		op.url = p.newURL()
		*op.url = *bulk.url
	}
}

// itemValue looks up what r names in item, within the batch's budget.
func (p *parser) itemValue(op *operation, r *ref, item gjson.Result, where string) (gjson.Result, bool) {
	if p.items.scan -= int64(len(item.Raw)) * int64(r.parts); p.items.scan < 0 {
		p.opFault(op, "item references would walk more than %d bytes of items in this batch", maxRefScan)
		return gjson.Result{}, false
	}
	v := item.Get(r.arg)
	if !v.Exists() {
		p.opFault(op, "%s: no %q in the item", where, short(r.arg))
		return v, false
	}
	return v, true
}

// spend takes n bytes of operations made from templates.
func (p *parser) spend(op *operation, n int) bool {
	if p.items.bytes -= int64(n); p.items.bytes < 0 {
		p.opFault(op, "item templates would make more than max_reference_size (%d bytes) of operations in this batch", p.lim.maxRefSize)
		return false
	}
	return true
}

// renderItem joins pieces with the item's values as text, within the
// batch's budget. In a target, a value is escaped as a path segment
// before any '?' and as a query component after it, as references are;
// one that starts the target is the path itself, checked once whole.
func (p *parser) renderItem(op *operation, ps []piece, item gjson.Result, where string, target bool) (string, bool) {
	s, ok := p.itemText(op, ps, item, where, target)
	return s, ok && p.spend(op, len(s))
}

// itemText is renderItem without the budget's bytes.
func (p *parser) itemText(op *operation, ps []piece, item gjson.Result, where string, target bool) (string, bool) {
	var sb strings.Builder
	inQuery := false
	for _, pc := range ps {
		if pc.ref == nil {
			sb.WriteString(pc.lit)
			inQuery = inQuery || strings.Contains(pc.lit, "?")
			continue
		}
		v, ok := p.itemValue(op, pc.ref, item, where)
		if !ok {
			return "", false
		}
		s := v.Raw
		if v.Type == gjson.String {
			s = v.Str
		}
		switch {
		case !target:
		case sb.Len() == 0: // the path itself: checked whole
			inQuery = strings.Contains(s, "?")
		case inQuery:
			s = url.QueryEscape(s)
		default:
			s = url.PathEscape(s)
		}
		sb.WriteString(s)
	}
	return sb.String(), true
}

// renderItemBody fills in a JSON body template: a string that is exactly
// one reference takes the item's value with its type; in a longer string
// the value goes in as text.
func (p *parser) renderItemBody(op *operation, segs []bodySegment, item gjson.Result) ([]byte, bool) {
	var body []byte
	for _, seg := range segs {
		switch {
		case seg.raw != nil:
			body = append(body, seg.raw...)
		case len(seg.str) == 1 && seg.str[0].ref != nil:
			v, ok := p.itemValue(op, seg.str[0].ref, item, "body")
			if !ok {
				return nil, false
			}
			body = append(body, v.Raw...)
		default:
			s, ok := p.itemText(op, seg.str, item, "body", false)
			if !ok {
				return nil, false
			}
			body = jsontext.AppendString(body, s)
		}
	}
	return body, p.spend(op, len(body))
}
