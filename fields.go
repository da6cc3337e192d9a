package batch

import (
	"encoding/base64"
	"fmt"
	"net/http"
	"net/url"
	"strings"

	"github.com/tidwall/gjson"
	"golang.org/x/net/http/httpguts"
)

// The rules of each field of an operation, in the order the parser
// applies them: which fields there are, the id, the method, the headers,
// the body, the target (once its references are known), depends_on.

// field returns the bit of an operation field in the batch's format, 0
// for an unknown one.
func (p *parser) field(key string) int {
	if p.d != nil {
		return p.d.field(key)
	}
	return opField(key)
}

// opField returns the bit of an operation field, 0 for an unknown one.
func opField(key string) int {
	switch key {
	case "id", "name":
		return fieldID
	case "method":
		return fieldMethod
	case "path", "url", "relative_url":
		return fieldPath
	case "headers":
		return fieldHeaders
	case "body":
		return fieldBody
	case "body_encoding":
		return fieldBodyEncoding
	case "depends_on", "dependsOn":
		return fieldDependsOn
	case "rollback":
		return fieldRollback
	case "if":
		return fieldIf
	case "key":
		return fieldKey
	}
	return 0
}

func (p *parser) checkID(op *operation) {
	switch {
	case p.d != nil && !p.d.validID(op.id):
		p.opFault(op, "id %q must be %s", short(op.id), p.d.idRule)
	case p.d == nil && !validID(op.id):
		p.opFault(op, "id %q must be 1 to %d letters, digits, '_' or '-'", short(op.id), maxIDLength)
	}
}

// validID reports whether id can name an operation. Ids stand in
// references ({{ID.body}}), so they hold no '.', '{' or '}'.
func validID(id string) bool {
	if id == "" || len(id) > maxIDLength {
		return false
	}
	for i := 0; i < len(id); i++ {
		if !idByte(id[i]) {
			return false
		}
	}
	return true
}

func (p *parser) checkMethod(op *operation) {
	// A method is a token, so ASCII: checked before upper-casing, which
	// would fold "poſt" into "POST".
	if !httpguts.ValidHeaderFieldName(op.method) {
		p.opFault(op, "method %q is not a valid HTTP method", short(op.method))
		return
	}
	op.method = strings.ToUpper(op.method)
	if _, ok := p.lim.methods[op.method]; !ok {
		p.opFault(op, "method %s is not allowed here", short(op.method))
	}
}

// Headers an operation may not set: they frame the message or the
// connection, and a batch must not be a way to smuggle them.
var refusedHeaders = map[string]bool{
	"Host": true, "Content-Length": true, "Transfer-Encoding": true,
	"Connection": true, "Upgrade": true, "Keep-Alive": true, "Te": true,
	"Trailer": true,
}

// Headers some frameworks read as the method: they would get past methods.
var methodOverride = map[string]bool{
	"X-Http-Method-Override": true, "X-Http-Method": true, "X-Method-Override": true,
}

// isForwardedHeader reports whether name (canonical) claims a client
// address; such headers are dropped unless allow_forwarded_headers lists them.
func isForwardedHeader(name string) bool {
	return name == "Forwarded" || name == "X-Real-Ip" || strings.HasPrefix(name, "X-Forwarded-")
}

func (p *parser) parseHeaders(op *operation, v gjson.Result) http.Header {
	if !v.Exists() || v.Type == gjson.Null {
		return nil
	}
	if !v.IsObject() {
		p.opFault(op, "headers must be an object, got %s", short(v.Raw))
		return nil
	}
	h := make(http.Header)
	v.ForEach(func(k, val gjson.Result) bool {
		name := k.String()
		if !httpguts.ValidHeaderFieldName(name) {
			p.opFault(op, "header name %q is not a valid token", short(name))
			return true
		}
		if _, dup := h[http.CanonicalHeaderKey(name)]; dup {
			p.opFault(op, "header %s given twice", short(http.CanonicalHeaderKey(name)))
			return true
		}
		var values []string
		switch {
		case val.Type == gjson.String:
			values = []string{val.Str}
		case val.IsArray():
			val.ForEach(func(_, s gjson.Result) bool {
				if s.Type != gjson.String {
					p.opFault(op, "header %s: values must be strings, got %s", short(name), short(s.Raw))
					return false
				}
				values = append(values, s.Str)
				return true
			})
		default:
			p.opFault(op, "header %s must be a string or an array of strings, got %s", short(name), short(val.Raw))
			return true
		}
		p.addHeader(op, h, name, values)
		return true
	})
	return h
}

// addHeader adds a header an operation sets to h, by the rules every
// format shares: a token name, no value with CR, LF or NUL, none of the
// headers that frame the message or would get past methods, and no
// forwarded header unless allow_forwarded_headers lists it.
func (p *parser) addHeader(op *operation, h http.Header, name string, values []string) {
	if !httpguts.ValidHeaderFieldName(name) {
		p.opFault(op, "header name %q is not a valid token", short(name))
		return
	}
	name = http.CanonicalHeaderKey(name)
	if refusedHeaders[name] || strings.HasPrefix(name, "Proxy-") || methodOverride[name] {
		p.opFault(op, "header %s may not be set by an operation", short(name))
		return
	}
	for _, s := range values {
		if !httpguts.ValidHeaderFieldValue(s) {
			p.opFault(op, "header %s has a value with control characters (CR, LF or NUL)", short(name))
			return
		}
	}
	if isForwardedHeader(name) {
		if _, ok := p.lim.forwarded[name]; !ok {
			return // dropped: a batch never speaks for another address
		}
	}
	h[name] = values
}

// parseBody turns an operation's "body" into the bytes to send, and returns
// the Content-Type that goes with them unless the operation sets one.
func (p *parser) parseBody(op *operation, v, encoding gjson.Result) (ctype string) {
	if encoding.Exists() && (encoding.Type != gjson.String || encoding.Str != "base64") {
		p.opFault(op, "body_encoding must be \"base64\", got %s", short(encoding.Raw))
		return ""
	}
	switch {
	case !v.Exists() || v.Type == gjson.Null:
		if encoding.Exists() && op.index >= 0 {
			p.opFault(op, "body_encoding needs a body")
		}
		return ""
	case v.Type == gjson.String:
		if encoding.Exists() {
			b, err := base64.StdEncoding.DecodeString(v.Str)
			if err != nil {
				p.opFault(op, "body is not valid base64: %v", err)
				return ""
			}
			op.body = b
			ctype = "application/octet-stream"
		} else {
			op.body = []byte(v.Str)
			ctype = "text/plain; charset=utf-8"
		}
	default:
		if encoding.Exists() {
			p.opFault(op, "body_encoding \"base64\" needs a string body")
			return ""
		}
		op.body = []byte(v.Raw)
		ctype = "application/json"
	}
	return ctype
}

// checkTarget validates an operation's target and returns it parsed.
func (p *parser) checkTarget(op *operation, target string) *url.URL {
	u := p.newURL()
	msg := parseTargetInto(target, u)
	if msg == "" && p.lim.pathAllow != nil && !p.lim.pathAllow(u) {
		msg = fmt.Sprintf("path %q is not allowed here", short(u.Path))
	}
	if msg != "" {
		p.opFault(op, "%s", msg)
		return nil
	}
	return u
}

// parseTarget checks that t is an origin-form request target that cannot
// be read as another host or escape its path, and parses it. It returns a
// message for the client when t is refused.
func parseTarget(t string) (*url.URL, string) {
	u := new(url.URL)
	if msg := parseTargetInto(t, u); msg != "" {
		return nil, msg
	}
	return u, ""
}

// parseTargetInto is parseTarget writing the parsed target to u, so that
// a batch can parse its operations' targets into one allocation.
func parseTargetInto(t string, u *url.URL) string {
	if t == "" {
		return "path is required"
	}
	if t[0] != '/' || len(t) > 1 && t[1] == '/' {
		return fmt.Sprintf("path must be origin-form, got %q", short(t))
	}
	for i := 0; i < len(t); i++ {
		switch c := t[i]; {
		case c <= ' ' || c == 0x7f:
			return fmt.Sprintf("path must not hold control characters or spaces, got %q", short(t))
		case c == '\\':
			return fmt.Sprintf("path must not hold '\\', got %q", short(t))
		case c == '#':
			return fmt.Sprintf("path must not hold a fragment, got %q", short(t))
		}
	}
	p, query, hasQuery := strings.Cut(t, "?")
	escaped := strings.IndexByte(p, '%') >= 0
	if escaped {
		d, err := url.PathUnescape(p)
		if err != nil {
			return fmt.Sprintf("path has an invalid percent-escape, got %q", short(t))
		}
		// Decode again until stable, so that multiply encoded dot-segments
		// or separators ("%252e%252e") are seen as what a backend that
		// decodes more than once may make of them. Past the first decode a
		// '%' may be plain data ("50%25off" is "50%off"): only valid
		// escapes are decoded. Each round costs the path's length, so a
		// path still changing after maxDecodes rounds is refused: nesting
		// "%2525…" deeper would make validation quadratic.
		rounds := 1
		for p = d; ; rounds++ {
			if d = unescapeValid(p); d == p {
				break
			}
			if rounds == maxDecodes {
				return fmt.Sprintf("path is percent-encoded more than %d times, got %q", maxDecodes, short(t))
			}
			p = d
		}
		for i := 0; i < len(p); i++ {
			if c := p[i]; c < ' ' || c == 0x7f || c == '\\' {
				return fmt.Sprintf("path must not encode control characters or '\\', got %q", short(t))
			}
		}
	}
	if strings.IndexByte(p, '.') >= 0 {
		for seg := range strings.SplitSeq(p, "/") {
			// "..;x" is ".." to servers that take path parameters (Tomcat, Jetty).
			if seg, _, _ = strings.Cut(seg, ";"); seg == "." || seg == ".." {
				return fmt.Sprintf("path must not hold dot-segments, got %q", short(t))
			}
		}
	}
	if escaped || !plainPath(p) {
		parsed, err := url.ParseRequestURI(t)
		if err != nil {
			return fmt.Sprintf("path %q does not parse", short(t))
		}
		*u = *parsed
		return ""
	}
	// What url.ParseRequestURI makes of a path that needs no escaping,
	// without its allocation.
	*u = url.URL{Path: p, RawQuery: query, ForceQuery: hasQuery && query == ""}
	return ""
}

// maxDecodes bounds the rounds of percent-decoding a target is checked
// through: "%25252e" is "." after three.
const maxDecodes = 4

// plainPath reports whether p is a path that URL encoding leaves as it is,
// so that its URL has no RawPath.
func plainPath(p string) bool {
	for i := 0; i < len(p); i++ {
		switch c := p[i]; {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case strings.IndexByte("-_.~$&+,/:;=@", c) >= 0:
		default:
			return false
		}
	}
	return true
}

// unescapeValid decodes the valid %XX escapes of s and leaves the rest.
func unescapeValid(s string) string {
	if !strings.Contains(s, "%") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '%' && i+2 < len(s) && isHex(s[i+1]) && isHex(s[i+2]) {
			b.WriteByte(unhex(s[i+1])<<4 | unhex(s[i+2]))
			i += 2
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isHex(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case c >= 'a':
		return c - 'a' + 10
	case c >= 'A':
		return c - 'A' + 10
	}
	return c - '0'
}

// parseIf takes an operation's condition: native, or OData's in a JSON
// batch. The ids it names are looked up with depends_on.
func (p *parser) parseIf(op *operation, v gjson.Result, kind int) {
	switch {
	case v.Type != gjson.String:
		p.opFault(op, "if must be a string, got %s", short(v.Raw))
		return
	case kind == kindBulk:
		p.opFault(op, "the operation of a bulk batch cannot have an if: there is no other operation to test")
		return
	}
	parse := parseCondition
	if p.d != nil {
		parse = parseODataCondition
	}
	c, msg := parse(v.Str)
	if msg != "" {
		p.opFault(op, "%s", msg)
		return
	}
	op.cond = c
	p.linked = true
}

func (p *parser) parseDeps(op *operation, v gjson.Result) {
	var ids []string
	switch {
	case !v.Exists() || v.Type == gjson.Null:
	case v.Type == gjson.String:
		ids = []string{v.Str}
	case v.IsArray():
		v.ForEach(func(_, s gjson.Result) bool {
			if s.Type != gjson.String {
				p.opFault(op, "depends_on must hold operation ids (strings), got %s", short(s.Raw))
				return false
			}
			ids = append(ids, s.Str)
			return true
		})
	default:
		p.opFault(op, "depends_on must be an array of operation ids, got %s", short(v.Raw))
	}
	op.depIDs = ids
	p.linked = p.linked || len(ids) > 0
}

// newURL returns a zeroed URL, from the batch's slab while it lasts.
func (p *parser) newURL() *url.URL {
	if len(p.urls) == 0 {
		return new(url.URL)
	}
	u := &p.urls[0]
	p.urls = p.urls[1:]
	return u
}
