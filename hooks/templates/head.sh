#!/bin/sh
# >>> gitlora managed hook <<< (do not edit: `gitlora install` rewrites it, `gitlora uninstall` removes it)
# gitlora @HOOK@ hook, template v1: runs the hook it replaced (if any) with the same arguments and stdin,
# then appends one line to gitlora's spool: @HOOK@ TAB new-oid TAB unix-time TAB old-oid TAB info.
# Never fails the git command: our own errors are discarded, the exit status is the chained hook's.
gitlora_spool=@SPOOL@
gitlora_chained=@CHAINED@
gitlora_repo=@REPO@
gitlora_status=0
if [ -n "$gitlora_chained" ] && [ -x "$gitlora_chained" ]; then
	"$gitlora_chained" "$@"
	gitlora_status=$?
fi
{
	# installed into a core.hooksPath dir (maybe shared by other repositories): spool only our repository
	if [ -n "$gitlora_repo" ]; then
		[ "$(git rev-parse --path-format=absolute --git-common-dir)" = "$gitlora_repo" ] || exit $gitlora_status
	fi
	gitlora_info=
	if [ @HOOK@ = post-merge ] && [ "$1" = 1 ]; then gitlora_info=squash; fi
	# one process for both fields: prints "--max-age=<now>", the oid of HEAD, "--"
	gitlora_out=$(git rev-parse --since=now HEAD --) &&
	set -- $gitlora_out && [ -n "$2" ] &&
	{ [ -d "${gitlora_spool%/*}" ] || mkdir -p "${gitlora_spool%/*}"; } &&
	printf '@HOOK@\t%s\t%s\t\t%s\n' "$2" "${1#--max-age=}" "$gitlora_info" >>"$gitlora_spool"
} </dev/null >/dev/null 2>&1
exit $gitlora_status
