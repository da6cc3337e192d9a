package batch

import (
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Operations run through the handlers after batch, not through the
// server: its access log would see one POST for a hundred DELETEs. Each
// operation gets the entry a lone request would, written as the server
// writes one (caddyhttp.Server.logRequest) to the loggers the server's
// log config names for the host, with "batch": {id, op_id, index}.

// accessLoggers returns the loggers of the server's access log for the
// batch's host, nil when the site does not log or operations are not to
// be logged.
func (rn *runner) accessLoggers() []*zap.Logger {
	logs := rn.srv.Logs
	if rn.h.SkipOperationLogs || logs == nil {
		return nil
	}
	host, _, err := net.SplitHostPort(rn.conn.host)
	if err != nil {
		host = rn.conn.host
	}
	host = strings.ToLower(host)
	if !shouldLogHost(logs, host) {
		return nil
	}
	base := rn.h.accessLog
	names := loggerNames(logs, host)
	loggers := make([]*zap.Logger, 0, len(names))
	for _, name := range names {
		if name == "" {
			loggers = append(loggers, base)
		} else {
			loggers = append(loggers, base.Named(name))
		}
	}
	return loggers
}

// shouldLogHost is caddyhttp.Server.shouldLogRequest for a host.
func shouldLogHost(logs *caddyhttp.ServerLogConfig, host string) bool {
	for name := range logs.LoggerNames {
		if certmagic.MatchWildcard(host, name) {
			return true
		}
	}
	for _, skip := range logs.SkipHosts {
		if certmagic.MatchWildcard(host, skip) {
			return false
		}
	}
	return !logs.SkipUnmappedHosts
}

// loggerNames is caddyhttp.ServerLogConfig's choice of loggers for a host:
// its own, those of a wildcard that matches it, or the default.
func loggerNames(logs *caddyhttp.ServerLogConfig, host string) []string {
	if names, ok := logs.LoggerNames[host]; ok {
		return names
	}
	labels := strings.Split(host, ".")
	for i := range labels {
		if labels[i] == "" {
			continue
		}
		labels[i] = "*"
		if names, ok := logs.LoggerNames[strings.Join(labels, ".")]; ok {
			return names
		}
	}
	return []string{logs.DefaultLoggerName}
}

// logOperation writes the access log entry of one attempt at op: logged
// is the sub-request as it entered the chain, req as it left it.
func (rn *runner) logOperation(logged, req *http.Request, op *operation, w *opWriter, took time.Duration) {
	ctx := req.Context()
	if skip, ok := caddyhttp.GetVar(ctx, caddyhttp.LogSkipVar).(bool); ok && skip {
		return // log_skip, as for a lone request
	}
	status := w.status
	if status == 0 {
		status = http.StatusOK
	}
	level := zapcore.InfoLevel
	if status >= 500 {
		level = zapcore.ErrorLevel
	}
	if name, ok := caddyhttp.GetVar(ctx, caddyhttp.LogLevelVar).(string); ok {
		if l, err := zapcore.ParseLevel(name); err == nil && l >= zapcore.DebugLevel && l <= zapcore.ErrorLevel {
			level = l
		}
	}
	var fields []zapcore.Field
	for _, logger := range rn.logs {
		c := logger.Check(level, "handled request")
		if c == nil {
			continue
		}
		if fields == nil {
			repl, _ := ctx.Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
			userID := ""
			if repl != nil {
				userID, _ = repl.GetString("http.auth.user.id")
			}
			credentials := rn.srv.Logs.ShouldLogCredentials
			fields = []zapcore.Field{
				zap.Object("request", caddyhttp.LoggableHTTPRequest{Request: logged, ShouldLogCredentials: credentials}),
				zap.Int("bytes_read", len(op.body)),
				zap.String("user_id", userID),
				zap.Duration("duration", took),
				zap.Int("size", len(w.body)),
				zap.Int("status", status),
				zap.Object("resp_headers", caddyhttp.LoggableHTTPHeader{Header: w.header, ShouldLogCredentials: credentials}),
				zap.Dict("batch", zap.String("id", rn.id), zap.String("op_id", op.id), zap.Int("index", op.index)),
			}
		}
		c.Write(fields...)
	}
}
